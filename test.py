"""Evaluate trained DEEN/AGW checkpoints (ours or released) with the full protocols of SYSU-MM01,
RegDB and LLCM: every distinct test image passes through the network once, all trials reuse it."""
import sys

from evaluation import build_test_parser, parse_test_args, run_test
from utils import run_main, setup_runtime


def build_parser():
    return build_test_parser(description=__doc__)


def parse_args(argv=None):
    return parse_test_args(argv, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    device, ctx = setup_runtime(args)
    run_test(args, device, ctx)
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
