#!/bin/sh
# issue 15 GPU check on one H200 (< 8 min): writes runs/gpu_check/gpu_check.{json,md}. PYTHON picks the interpreter
# (one with a CUDA build of torch and requirements/common.txt installed; default python3).
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${1:-runs/gpu_check}"
