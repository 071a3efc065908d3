"""Makes torch-sys 0.26's generated C++ wrappers compile against an older
libtorch: every wrapper the compiler rejected (an operator the older
release lacks or declares differently) gets a body that throws instead.

    python patch_torch_sys.py TORCH_SYS_DIR BUILD_LOG

Exits 1 when the log names no wrapper to patch (the failure is elsewhere).
"""

import pathlib
import re
import sys

root, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
path = root / "libtch" / "torch_api_generated.cpp"
lines = path.read_text().split("\n")
errors = {
    int(m.group(1))
    for m in re.finditer(r"torch_api_generated\.cpp:(\d+):\d+: error", log.read_text())
}
patched = 0
for line_no in sorted(errors, reverse=True):
    i = line_no - 1
    start = i
    while start > 0 and "PROTECT(" not in lines[start]:
        start -= 1
    end = i
    while end < len(lines) - 1 and lines[end].strip() != ")":
        end += 1
    if "PROTECT(" not in lines[start] or lines[end].strip() != ")":
        continue
    lines[start + 1 : end] = ['    throw std::runtime_error("not available in this libtorch");']
    patched += 1
path.write_text("\n".join(lines))
print(f"patched {patched} wrappers")
sys.exit(0 if patched else 1)
