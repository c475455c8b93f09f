#!/usr/bin/env bash
# Quickstart 1: set up, then run the whole pipeline on the embedded defaults
# (SmolLM2 on a local llama.cpp server + the preview engine). Prints final.mp4's path last.
source "$(dirname "$0")/env.sh"
IDEA="${1:-a lighthouse keeper befriends a lonely whale}"
exec story-to-video run --idea "$IDEA" --scenes 3 --target-seconds 12
