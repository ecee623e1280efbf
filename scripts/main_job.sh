#!/usr/bin/env bash
# The main job end to end: export SAM 2.1 hiera_tiny, segment a real photo, write an annotated PNG, print timings.
#   bash scripts/main_job.sh                 # official checkpoint (downloaded), else RANDOM weights, loudly
#   bash scripts/main_job.sh path/to/sam2.1_hiera_tiny.pt
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-models/hiera_tiny}
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ $# -ge 1 ]; then
  sam2rt export --model hiera_tiny --checkpoint "$1" --out "$MODEL_DIR"
elif ! sam2rt export --model hiera_tiny --out "$MODEL_DIR"; then
  echo "!!! The official checkpoint could not be downloaded (see above)." >&2
  echo "!!! FALLING BACK TO RANDOM WEIGHTS (seed 0): the pipeline runs, the masks are meaningless." >&2
  echo "!!! Pass a real checkpoint: bash scripts/main_job.sh sam2.1_hiera_tiny.pt" >&2
  sam2rt export --model hiera_tiny --random-weights 0 --out "$MODEL_DIR"
fi
# A real photograph (scikit-image's astronaut, NASA, public domain), 512x512.
python -c "import skimage.data, cv2; cv2.imwrite('$OUT/astronaut.png', skimage.data.astronaut()[..., ::-1])"
sam2rt segment --model-dir "$MODEL_DIR" --image "$OUT/astronaut.png" \
  --point 260,120,1 --box 140,20,380,300 --out "$OUT/astronaut_annotated.png"
