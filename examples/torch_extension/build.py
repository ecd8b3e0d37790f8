"""Builds (or reuses) the example extension with torch.utils.cpp_extension.

    from build import load_extension
    ext = load_extension()
    t = ext.alloc_on(pool.handle, 1, [1024])

The extension links target/debug/libmeshmem.so (or $MESHMEM_LIB), the same
library the meshmem Python package loads, and is built once into
target/torch_extension; later calls reuse it.
"""

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def load_extension(verbose=False):
    from torch.utils import cpp_extension

    library = Path(os.environ.get("MESHMEM_LIB", REPO / "target" / "debug" / "libmeshmem.so")).resolve()
    if not library.exists():
        raise FileNotFoundError(f"{library} does not exist; build it with `cargo build -p meshmem-ffi`")
    build = REPO / "target" / "torch_extension"
    header = REPO / "ffi" / "include" / "meshmem.h"
    # cpp_extension rebuilds when sources or flags change, not headers, so a
    # digest of meshmem.h goes into the flags.
    digest = hashlib.sha256(header.read_bytes()).hexdigest()[:16]
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="meshmem_ext",
        sources=[str(HERE / "meshmem_ext.cpp")],
        extra_include_paths=[str(header.parent)],
        extra_cflags=[f"-DMESHMEM_HEADER_DIGEST={digest}"],
        extra_ldflags=[str(library), f"-Wl,-rpath,{library.parent}"],
        build_directory=str(build),
        verbose=verbose,
    )


if __name__ == "__main__":
    print(load_extension(verbose=True))
