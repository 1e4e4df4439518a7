"""Build flashavatar's one compiled extension, ``flashavatar._C``, from ``csrc/``.

CUDA sources are compiled when ``nvcc`` is found (``CUDA_HOME`` or the PATH) or ``FORCE_CUDA=1``; never by
probing for a GPU, so a machine without one (CI) still compiles the kernels. ``FORCE_CUDA=0`` builds the CPU
ops only. Honoured: ``MAX_JOBS`` (parallel compile jobs), ``TORCH_CUDA_ARCH_LIST`` (GPU architectures, e.g.
``9.0``), ``DEBUG=1`` (``-O0 -g``, plus ``-lineinfo`` for CUDA).

Install with ``pip install --no-build-isolation -e .`` so the extension is built against *your* torch.
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit root (the folder above nvcc's bin/), or None.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on the PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc -> /usr/local). Ask nvcc itself where it lives instead.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    return os.path.realpath(line.split("=", 1)[1].strip())
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def _cuda_wanted():
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force.strip() not in ("", "1"):
        return False
    has_nvcc = _find_cuda_home() is not None
    if force == "1" and not has_nvcc:
        sys.exit("flashavatar setup: FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME to the toolkit root")
    return has_nvcc


def _bundles_libstdcxx(cxx):
    """True when ``cxx -shared`` links its own copy of libstdc++ into a shared object (False: the shared
    libstdc++.so; None: could not tell). Some toolchain wrappers add -static-libstdc++. An extension built so
    throws C++ exceptions (every bad-input error) with its own runtime while torch catches them with the
    process's, and the process crashes instead of raising."""
    with tempfile.TemporaryDirectory() as tmp:
        src, so = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as fh:
            fh.write('#include <stdexcept>\nvoid fa_probe(int x) { if (x) throw std::runtime_error("x"); }\n')
        try:
            if subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", src, "-o", so], capture_output=True,
                              timeout=120).returncode != 0:
                return None
            out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return None if out.returncode != 0 else " __cxa_throw" in out.stdout


def _use_shared_cxx_runtime():
    """Pick a C++ compiler that links libstdc++ as a shared library (see _bundles_libstdcxx): the configured
    one (CXX, else Python's), else g++/c++ from the PATH or /usr/bin, with a note. Changes CC/CXX only then."""
    configured = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if _bundles_libstdcxx(configured) is not True:
        return
    seen = {configured}
    for name in ("g++", "c++", "/usr/bin/g++", "/usr/bin/c++"):
        path = shutil.which(name)
        if not path or path in seen:
            continue
        seen.add(path)
        if _bundles_libstdcxx(path) is False:
            os.environ["CXX"] = path
            cc = os.path.join(os.path.dirname(path), os.path.basename(path).replace("g++", "gcc").replace("c++", "cc"))
            if os.path.exists(cc):
                os.environ["CC"] = cc
            print(f"flashavatar setup: {configured} links libstdc++ statically into shared objects, so C++ errors "
                  f"would crash instead of raising; building with {path}", file=sys.stderr)
            return
    print(f"flashavatar setup: WARNING: {configured} links libstdc++ statically into shared objects and no other "
          "C++ compiler was found: bad-input errors from the ops will crash the process. Set CXX to a compiler "
          "that links the shared libstdc++.", file=sys.stderr)


def get_extensions():
    _use_shared_cxx_runtime()
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _cuda_wanted()
    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    # setuptools puts every object in one folder: two sources with one stem would overwrite each other.
    stems = Counter(os.path.splitext(os.path.basename(s))[0] for s in sources)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        sys.exit(f"flashavatar setup: source files share a stem {clash}; rename one of them")

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = list(opt)  # the C++ standard comes from torch (C++17 or C++20 by version)
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
    if debug:
        nvcc_flags.append("-lineinfo")
    define_macros = [("WITH_CUDA", None)] if with_cuda else []
    kwargs = dict(
        name="flashavatar._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    )
    ext = CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)
    print(f"flashavatar setup: building {'CUDA + CPU' if with_cuda else 'CPU-only'} extension "
          f"from {len(sources)} sources", file=sys.stderr)
    return [ext]


def main():
    # The Makefile registers the package with FLASHAVATAR_SKIP_EXT=1 and then builds the extension in place
    # with `setup.py build_ext --inplace`, which is incremental (ninja), unlike pip's fresh build folder.
    skip = os.environ.get("FLASHAVATAR_SKIP_EXT") == "1"
    ext_modules = [] if skip else get_extensions()  # first: it sets CUDA_HOME before torch reads it
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


if __name__ == "__main__":
    main()
