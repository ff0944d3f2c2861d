"""native.py: a kernel's build depends on its source and the local headers it includes."""

from __future__ import annotations

from kvcache import native


def test_the_build_hash_covers_included_headers(tmp_path):
    (tmp_path / "part.h").write_text("static int one(void) { return 1; }\n")
    source = tmp_path / "k.c"
    source.write_text('#include <stdint.h>\n#include "part.h"\nint two(void) { return one() + 1; }\n')
    before = native.source_bytes(source)
    assert b"return 1" in before
    (tmp_path / "part.h").write_text("static int one(void) { return 2; }\n")
    assert native.source_bytes(source) != before
