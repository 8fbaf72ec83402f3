#!/usr/bin/env python
"""Write a GGUF file from a checkpoint or at synthetic shapes (code in llama2np.testing.gguf_export; needs the gguf extra).

    python scripts/checkpoints/gguf_export.py --help
"""

from llama2np.testing.gguf_export import main

if __name__ == "__main__":
    raise SystemExit(main())
