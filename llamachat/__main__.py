import sys

from llamachat.cli.app import main

sys.exit(main())
