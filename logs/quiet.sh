#!/bin/bash
# run a command with every other CPU-heavy process of this machine stopped (SIGSTOP), then resume them
others=$(ps -eo pid,pcpu,comm --no-headers | awk '$3 ~ /python|qbench|pytest/ {print $1}' | grep -v -x "$$")
kill -STOP $others 2>/dev/null
trap 'kill -CONT $others 2>/dev/null' EXIT
"$@"
