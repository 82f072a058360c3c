"""The tests' compiler cache (tests/compiler_cache/g++): a second compile of the same source with the same flags is a
copy of the first one's output; anything else reaches the real compiler."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import COMPILER_CACHE as WRAPPER

SOURCE = 'extern "C" int answer() { return %d; }\n'

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture
def compile_with_cache(tmp_path):
    """Runs the wrapper over a real g++ that logs each call; returns (run, calls)."""
    log = tmp_path / "calls.log"
    real = tmp_path / "real-g++"
    real.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {shutil.which("g++")} "$@"\n')
    real.chmod(0o755)
    env = {**os.environ, "CXX_CACHE_REAL": str(real), "CXX_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([str(WRAPPER), *map(str, args)], env=env, capture_output=True, text=True)

    return run, lambda: log.read_text().splitlines() if log.exists() else []


def kernel(folder, value):
    """A source file in `folder` named, as Inductor names its files, by its text."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"k{value}.cpp"
    path.write_text(SOURCE % value)
    return path


def test_the_same_compile_in_another_folder_is_a_copy(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    first, second = kernel(tmp_path / "a", 42), kernel(tmp_path / "b", 42)
    assert run(first, "-shared", "-fPIC", "-O2", "-o", first.with_suffix(".so")).returncode == 0
    assert run(second, "-shared", "-fPIC", "-O2", "-o", second.with_suffix(".so")).returncode == 0
    assert len(calls()) == 1
    assert first.with_suffix(".so").read_bytes() == second.with_suffix(".so").read_bytes()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".partial-")]


def test_other_text_or_other_flags_compile_again(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    source = kernel(tmp_path / "a", 1)
    run(source, "-shared", "-fPIC", "-O2", "-o", tmp_path / "one.so")
    run(source, "-shared", "-fPIC", "-O3", "-o", tmp_path / "two.so")
    other = kernel(tmp_path / "b", 2)
    run(other, "-shared", "-fPIC", "-O2", "-o", tmp_path / "three.so")
    assert len(calls()) == 3 and len(os.listdir(tmp_path / "cache")) == 3


def test_a_failed_compile_keeps_its_status_and_is_not_kept(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    for _ in range(2):
        done = run(broken, "-shared", "-fPIC", "-o", tmp_path / "broken.so")
        assert done.returncode != 0 and "error" in done.stderr
    assert len(calls()) == 2 and not (tmp_path / "cache").exists()


def test_what_is_not_one_source_into_one_output_reaches_the_compiler(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    source = kernel(tmp_path, 7)
    for _ in range(2):
        assert run("-E", source, "-o", tmp_path / "pre.ii").returncode == 0  # preprocessing
        assert run("--version").returncode == 0
    assert len(calls()) == 4 and not (tmp_path / "cache").exists()


def test_inductor_compiles_this_sessions_kernels_with_it():
    """conftest.py made the wrapper the compiler of this process and of those it starts, before Inductor read it:
    through a launcher named g++ (Inductor picks its flags by the name) that starts it with this Python."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    if not os.environ.get("CXX_CACHE_DIR"):
        pytest.skip("the session runs without the compiler cache (CXX_CACHE_DIR set empty, or no g++)")
    launcher = Path(get_cpp_compiler())
    assert launcher.name == "g++" and f'{shlex.quote(str(WRAPPER))} "$@"' in launcher.read_text()
