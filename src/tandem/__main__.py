import sys

from .cli import main

if __name__ == "__main__":  # vLLM's engine starts worker processes that import the main module again
    sys.exit(main())
