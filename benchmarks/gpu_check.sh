#!/bin/sh
# issue 15 GPU check on one H200 (< 8 min): writes runs/gpu_check/gpu_check.{json,md}
exec python benchmarks/gpu_check.py --out "${1:-runs/gpu_check}"
