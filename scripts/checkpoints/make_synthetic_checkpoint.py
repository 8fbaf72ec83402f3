#!/usr/bin/env python
"""Write a random-weight Llama 2 checkpoint at real shapes, without torch (code in llama2np.testing.synthetic).

    python scripts/checkpoints/make_synthetic_checkpoint.py --help
"""

from llama2np.testing.synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
