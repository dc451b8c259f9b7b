#!/usr/bin/env bash
# The GPU check: captured training steps equal eager ones over hundreds of steps, KFAC and the marginal likelihood
# on CUDA equal the CPU's for every layer family, a captured Laplace run trains, resumes and reports
# (tests/test_cuda.py, skipped where there is no GPU), then the speed of training at the paper's width
# (benchmarks/train_speed.py). About 4 minutes on one H200; needs cifar10.npz with >= 11,000 training images in
# --data-dir / $ELLA_DATA / ./data.
#
#   bash benchmarks/gpu_check.sh [extra train_speed.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
python3 benchmarks/train_speed.py --device cuda --alpha 10 --n-images 10000 --layer ffc_conv conv --repeats 3 "$@"
