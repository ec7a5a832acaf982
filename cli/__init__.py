"""The `nvfp4` command line: thin argparse front-ends over `quant` and `calibration`."""
