"""`python -m data_shards data ...`: the data subcommands without the trainer's console script."""
import sys

from .cli import main

sys.exit(main())
