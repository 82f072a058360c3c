"""The tests' compiler cache (tests/compiler_cache/g++): a second compile of the same source with the same flags is a
copy of the first one's output; anything else reaches the real compiler."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT

WRAPPER = ROOT / "tests" / "compiler_cache" / "g++"
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


def outputs(cache):
    """The compiled outputs that `cache` keeps (beside them: one lock file per compile)."""
    return [p for p in cache.iterdir() if p.suffix != ".lock"] if cache.exists() else []


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
    assert len(calls()) == 3 and len(outputs(tmp_path / "cache")) == 3


def test_a_failed_compile_keeps_its_status_and_is_not_kept(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    for _ in range(2):
        done = run(broken, "-shared", "-fPIC", "-o", tmp_path / "broken.so")
        assert done.returncode != 0 and "error" in done.stderr
    assert len(calls()) == 2 and not outputs(tmp_path / "cache")


def test_what_is_not_one_source_into_one_output_reaches_the_compiler(compile_with_cache, tmp_path):
    run, calls = compile_with_cache
    source = kernel(tmp_path, 7)
    for _ in range(2):
        assert run("-E", source, "-o", tmp_path / "pre.ii").returncode == 0  # preprocessing
        assert run("--version").returncode == 0
    assert len(calls()) == 4 and not (tmp_path / "cache").exists()


def test_the_same_compile_started_twice_at_once_runs_once(tmp_path):
    """The second of two identical compiles waits for the first, then copies its output."""
    log = tmp_path / "calls.log"
    slow = tmp_path / "real-g++"  # a compiler that takes a second: the two calls overlap
    slow.write_text(f'#!/bin/sh\necho "$*" >> {log}\nsleep 1\nexec {shutil.which("g++")} "$@"\n')
    slow.chmod(0o755)
    env = {**os.environ, "CXX_CACHE_REAL": str(slow), "CXX_CACHE_DIR": str(tmp_path / "cache")}
    sources = [kernel(tmp_path / folder, 5) for folder in ("a", "b")]
    started = [subprocess.Popen([str(WRAPPER), s, "-shared", "-fPIC", "-o", s.with_suffix(".so")], env=env)
               for s in sources]
    assert [p.wait() for p in started] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert sources[0].with_suffix(".so").read_bytes() == sources[1].with_suffix(".so").read_bytes()


def test_inductor_compiles_this_sessions_kernels_with_it():
    """conftest.py made the wrapper the compiler of this process and of those it starts, before Inductor read it."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    if not os.environ.get("CXX_CACHE_DIR"):
        pytest.skip("the session runs without the compiler cache (CXX_CACHE_DIR set empty, or no g++)")
    assert get_cpp_compiler() == str(WRAPPER)
