"""Train DEEN (or the AGW baseline) on SYSU-MM01, RegDB, LLCM or the embedded demo dataset:
one process or many (torchrun, DDP), mixed precision, exact resume and atomic checkpoints."""
import sys

from training import build_parser, main
from utils import run_main

__all__ = ['build_parser', 'main']  # build_parser: its flags, read by tests/test_docs.py

if __name__ == '__main__':
    sys.exit(run_main(main))
