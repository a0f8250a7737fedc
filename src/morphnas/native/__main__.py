"""``python -m morphnas.native``: build the native kernels now, into torch's extension cache.

``make setup`` runs it, so that the build (under a minute, once per install and kind of CPU)
belongs to the install rather than stalling the first search, training or ``bench``. A failed
build is not an error here: it warns, as it would at first use, and the Python kernels run.
"""

from __future__ import annotations

from morphnas import native


def main() -> None:
    if native.native_requested() == "off":
        print(f"{native.NATIVE_ENV}=off: the native kernels are not used, nothing to build")
        return
    print("morphnas: compiling the native kernels for this CPU unless cached", flush=True)
    if native.darts_supernet() is None:  # one library holds every kernel
        print("morphnas: no native kernels (see the warning above); the Python kernels will run")
        return
    print(f"morphnas: native kernels ready, built or loaded in {native.build_seconds:.1f} s")


if __name__ == "__main__":
    main()
