#!/usr/bin/env bash
# Regenerate the sample recordings in samples/audio/ with espeak-ng (offline speech synthesis).
# The spoken sentences are listed in samples/audio/TRANSCRIPTS.txt (not matched by the task
# pattern). Needs: espeak-ng, ffmpeg. Usage: samples/make_samples.sh
set -euo pipefail
cd "$(dirname "$0")/audio"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

say() {  # say <text> <output>; 16 kHz mono, codec chosen by the output's extension
    espeak-ng -v en-us -s 150 -w "$tmp/raw.wav" "$1"
    case "$2" in
        *.wav) ffmpeg -v error -y -i "$tmp/raw.wav" -ar 16000 -ac 1 -c:a pcm_s16le "$2" ;;
        *.mp3) ffmpeg -v error -y -i "$tmp/raw.wav" -ar 16000 -ac 1 -c:a libmp3lame -b:a 32k "$2" ;;
        *.ogg) ffmpeg -v error -y -i "$tmp/raw.wav" -ar 16000 -ac 1 -c:a libvorbis -q:a 2 "$2" ;;
    esac
}

T1="The quick brown fox jumps over the lazy dog, and then it runs back into the forest."
T2="Please remember to bring your umbrella tomorrow because the weather will be rainy."
T3="Our meeting starts at nine in the morning, so we should leave the house early."

say "$T1" fox.wav
say "$T2" umbrella.mp3
say "$T3" meeting.ogg

{
    echo "# Source sentences of the espeak-ng samples (regenerate with samples/make_samples.sh)"
    echo "fox.wav	$T1"
    echo "umbrella.mp3	$T2"
    echo "meeting.ogg	$T3"
} > TRANSCRIPTS.txt
ls -l
