import sys

INSTALL = {"torch": "pip install torch==2.13.0", "numpy": "pip install numpy", "safetensors": "pip install safetensors",
           "PIL": "pip install Pillow"}


def run() -> int:
    try:
        from .cli import main
        return main()
    except ModuleNotFoundError as e:  # a missing dependency is named with its install command, not a traceback
        if e.name not in INSTALL:
            raise
        print(f"error: VAE Fix needs {e.name}, which is not installed here. Install it with: {INSTALL[e.name]} "
              "(or everything: pip install torch==2.13.0 -r requirements-dev.txt)", file=sys.stderr)
        return 2


sys.exit(run())
