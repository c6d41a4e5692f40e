"""The build: Cython extensions from native/ and gRPC code generated from proto/.

Metadata, dependencies and entry points live in pyproject.toml. The source
directories kernel/, native/ and plugins/ install as planes.kernel,
planes.native and planes.plugins; the generated code installs as
planes.<plane>.v1, mirroring proto/planes/<plane>/v1 so that the imports
inside generated files resolve. Generated code is never committed.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SOURCE_PACKAGES = {"planes.kernel": "kernel", "planes.native": "native", "planes.plugins": "plugins"}


def find_packages() -> list[str]:
    packages = []
    for package, directory in SOURCE_PACKAGES.items():
        for init in sorted((ROOT / directory).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / directory)
            packages.append(".".join([package, *relative.parts]) if relative.parts else package)
    return packages


def generate_protos(out_dir: str) -> None:
    """Run protoc (from grpcio-tools) over proto/ into ``out_dir``, with .pyi stubs."""
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on proto/; see the messages above")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        generate_protos(self.build_lib)


def extensions() -> list[Extension]:
    sources = sorted((ROOT / "native").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize

    # native/ on both include paths: the modules cimport its shared declarations (sha256_threads.pxd)
    # and include the multi-buffer SHA-256 (sha256_mb.h), which is compiled per target by function
    # attributes and so needs no -march flag.
    shared = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "native").iterdir() if path.suffix in SHARED)
    modules = [
        Extension(f"planes.native.{source.stem}", [str(source.relative_to(ROOT))], include_dirs=["native"],
                  depends=shared, extra_compile_args=["-O3"],
                  libraries=["crypto"] if source.stem in CRYPTO_USERS else [])
        for source in sources
    ]
    return cythonize(modules, language_level=3, include_path=[str(ROOT / "native")],
                     compiler_directives={"boundscheck": False, "wraparound": False})


#: Native modules that link OpenSSL's libcrypto (for SHA-256).
CRYPTO_USERS: set[str] = {"chain", "codec", "eventbatch", "sha256"}
#: Files of native/ that the modules share; listed as dependencies, so they rebuild and ship in the sdist.
SHARED = {".h", ".pxd"}

setup(
    package_dir=SOURCE_PACKAGES,
    packages=find_packages(),
    package_data={"planes.kernel": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPyWithProtos},
)
