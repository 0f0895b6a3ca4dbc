#!/usr/bin/env bash
# CI gate for a folder of downloaded models: scan everything, fail on anything dangerous,
# convert the rest to verified .safetensors.
#
#   examples/ci_scan_convert.sh DOWNLOADS OUT_DIR
#
# `sdtool scan` exits 0 when every file is clean, 1 when something is dangerous, 2 when a file
# could not be scanned. A clean folder is converted in one batch. Otherwise each file is
# scanned on its own, only the clean ones are converted, and the job fails (exit 1) with the
# list of files that were held back. Set SDTOOL to use another sdtool (e.g. "python -m sdtool").
set -uo pipefail

downloads=${1:?usage: $0 DOWNLOADS OUT_DIR}
out=${2:?usage: $0 DOWNLOADS OUT_DIR}
read -r -a sdtool <<< "${SDTOOL:-sdtool}"
mkdir -p "$out"

"${sdtool[@]}" scan "$downloads"
scan_rc=$?

if [ "$scan_rc" -eq 0 ]; then
    # every file is clean: convert them all; exit 1 if any conversion failed
    "${sdtool[@]}" convert "$downloads" --out-dir "$out" --verify --jobs 2
    exit $?
fi

echo "scan exit $scan_rc: converting only the files that scan clean" >&2
held_back=()
failed=0
while IFS= read -r -d '' file; do
    "${sdtool[@]}" scan "$file" > /dev/null
    rc=$?
    if [ "$rc" -ne 0 ]; then
        held_back+=("$file (scan exit $rc)")
        continue
    fi
    rel=${file#"$downloads"/}
    target="$out/${rel%.*}.safetensors"
    mkdir -p "$(dirname "$target")"
    if [ -e "$target" ]; then
        continue
    fi
    "${sdtool[@]}" convert "$file" "$target" --verify || failed=1
done < <(find "$downloads" -type f \( -name '*.ckpt' -o -name '*.pt' -o -name '*.pth' \
    -o -name '*.bin' -o -name '*.safetensors' -o -name '*.sft' -o -name '*.npy' -o -name '*.npz' \
    -o -name '*.pkl' \) -print0 | sort -z)

for f in "${held_back[@]}"; do
    echo "held back: $f" >&2
done
echo "${#held_back[@]} file(s) held back; see the scan report above" >&2
exit 1
