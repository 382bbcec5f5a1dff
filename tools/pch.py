"""csrc/pch.h as a GCC precompiled header for setup.py's build (torch's ninja build of the extension).

The header is compiled once with exactly the flags torch's ninja file gives every C++ source (taken from the call
that writes that file), and each C++ source then gets `-include <build>/pch/tlkernels_pch.h`, beside which the
`.gch` lies. GCC uses the `.gch` only when it was built with compatible flags, and otherwise parses the header
(`-Winvalid-pch` says so): the build is the same either way, only faster. Compilers other than GCC, and torch
versions without the hook used here, build without it.
"""
import hashlib
import inspect
import os
import shlex
import shutil
import subprocess


def _is_gcc(compiler):
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out.lower()


def _build(compiler, header, cflags, post_cflags, build_directory, stamp_extra):
    """Compiles `header` into build_directory/pch/; returns the flags that make each source use it."""
    out_dir = os.path.join(build_directory, "pch")
    os.makedirs(out_dir, exist_ok=True)
    copy = os.path.join(out_dir, "tlkernels_pch.h")
    gch = copy + ".gch"
    with open(header, "rb") as fh:
        text = fh.read()
    cmd = " ".join([shlex.quote(compiler)] + list(cflags) + ["-x", "c++-header", shlex.quote(copy), "-o",
                                                             shlex.quote(gch)] + list(post_cflags))
    # a new header, flags or torch: a new .gch (GCC checks flags, not the content of the headers it read)
    stamp = hashlib.sha256(text + cmd.encode() + stamp_extra.encode()).hexdigest()
    stamp_file = os.path.join(out_dir, "stamp")
    if not (os.path.exists(gch) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp):
        with open(copy, "wb") as fh:
            fh.write(text)
        print(f"tlkernels setup: precompiling {os.path.relpath(header)}", flush=True)
        r = subprocess.run(cmd, shell=True)
        if r.returncode != 0:
            print("tlkernels setup: the precompiled header failed to build; compiling without it", flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            return []
        with open(stamp_file, "w") as fh:
            fh.write(stamp)
    # -Wno-sign-compare: with the header precompiled, GCC instantiates torch's inline templates in every source,
    # and one of them (c10's TypeSafeSignMath) trips the warning that parsing the header plainly never reaches
    return ["-Winvalid-pch", "-Wno-sign-compare", "-include", shlex.quote(copy)]


def use_precompiled_header(cpp_extension, header, stamp_extra=""):
    """Makes torch's ninja build of C++ sources (cpp_extension) use `header` precompiled, when it can."""
    original = getattr(cpp_extension, "_write_ninja_file_and_compile_objects", None)
    if original is None or os.name != "posix":
        return False
    params = inspect.signature(original).parameters
    if not {"cflags", "post_cflags", "build_directory"} <= set(params):
        return False
    compiler = cpp_extension.get_cxx_compiler()
    if not _is_gcc(compiler):
        return False

    def write_and_compile(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        a = bound.arguments
        a["post_cflags"] = list(a["post_cflags"]) + _build(compiler, header, a["cflags"], a["post_cflags"],
                                                           a["build_directory"], stamp_extra)
        return original(*bound.args, **bound.kwargs)

    cpp_extension._write_ninja_file_and_compile_objects = write_and_compile
    return True
