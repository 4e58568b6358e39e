"""How each checkpoint was trained, read from its folder for STUDY.md's headline caption."""


def test_provenance_reads_the_card_and_the_safetensors_header(tmp_path):
    import json
    import struct

    from qbench.study.provenance import card_facts

    folder = tmp_path / "tiny-x"
    folder.mkdir()
    (folder / "README.md").write_text("| training tokens | 4,096,000 |\n| wall time | 23 s on NVIDIA H200 |\n"
                                      "| precision | training autocast: none; weights stored as bfloat16 |\n")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    assert card_facts(folder) == {"device": "H200", "autocast": "none", "stored": "bf16", "tokens": 4096000}
    (folder / "README.md").write_text("| wall time | 3306 s on 1 threads |\n")
    assert card_facts(folder)["device"] == "CPU" and card_facts(folder)["tokens"] is None
