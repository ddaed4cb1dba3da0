import sys

from qlora_kit.cli import main

sys.exit(main())
