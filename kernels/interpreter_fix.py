"""Under TRITON_INTERPRET, make runtime loop bounds work with numpy >= 2.4 (triton issue 9171: the
interpreter's scalars are 1-element arrays, which numpy 2.4 refuses to convert by int()). Imported
by every Triton kernel module; does nothing without the interpreter."""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_scalar_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sparse_vdit_fixed", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch._sparse_vdit_fixed = True
    interpreter._patch_lang_tensor = patch


if INTERPRET:
    _fix_interpreter_scalar_index()
