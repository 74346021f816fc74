#!/usr/bin/env python3
"""The ABI guard: the layout table of the public SDK (gen_layout.py) compiled against the frozen
v1 headers (tests/abi/v1) must equal the one compiled against the current headers.
Usage: check_layout.py FROZEN_TABLE_EXE CURRENT_TABLE_EXE

Rules (the v1 contract, see docs/plugins.md "Versioning"):
- every member keeps its offset and its size; every enum constant and integer #define (flags,
  limits, ST_ABI_VERSION) keeps its value;
- a struct keeps its size and alignment, EXCEPT a struct that carries its own size (a member
  `struct_size`, or a plugin header `header`): those may GROW, because new members are only ever
  appended and the reader checks struct_size before touching them.
So appending a method to st_strategy_plugin_v1 passes; inserting one in the middle fails (every
later member moves); changing a member's type or an enum value fails.
When ST_ABI_VERSION itself changed, v1 is no longer the current ABI: the test skips (77) and asks
for the new generation to be frozen next to v1."""
import subprocess, sys


def table(exe):
    out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    structs, rest = {}, {}
    for line in out.splitlines():
        f = line.split()
        if f[0] == "struct":
            structs[f[1]] = (int(f[3]), int(f[5]))
        else:
            rest[(f[0], f[1])] = f[2:]
    return structs, rest


def main():
    fs, fr = table(sys.argv[1])
    cs, cr = table(sys.argv[2])
    abi_f, abi_c = fr[("define", "ST_ABI_VERSION")], cr[("define", "ST_ABI_VERSION")]
    if abi_f != abi_c:
        print("ST_ABI_VERSION is %s now (frozen: %s): copy the new headers to tests/abi/v%s and point the "
              "guard at them; v1 plugins are then judged by the loader's version probing" % (abi_c[0], abi_f[0],
                                                                                             abi_c[0]))
        return 77
    problems = []
    for key, val in fr.items():
        if key not in cr:
            problems.append("%s %s is gone" % key)
        elif cr[key] != val:
            what, name = key
            if what == "member":
                problems.append("%s moved or changed size: frozen offset %s size %s, now offset %s size %s"
                                % (name, val[1], val[3], cr[key][1], cr[key][3]))
            else:
                problems.append("%s %s changed: frozen %s, now %s" % (what, name, val[0], cr[key][0]))
    for name, (size, align) in fs.items():
        if name not in cs:
            problems.append("struct %s is gone" % name)
            continue
        csize, calign = cs[name]
        appendable = ("member", name + ".struct_size") in fr or ("member", name + ".header") in fr
        if calign != align:
            problems.append("struct %s: alignment %d, frozen %d" % (name, calign, align))
        if csize != size and not (appendable and csize > size):
            problems.append("struct %s: size %d, frozen %d%s" % (name, csize, size,
                            "" if appendable else " (it has no struct_size, so it can never grow)"))
    n_members = sum(1 for k in fr if k[0] == "member")
    if problems:
        print("The public ABI changed without an ABI version bump (tests/abi/v1 is the frozen v1 SDK):")
        for p in problems:
            print("  " + p)
        print("Append new members at the END of a struct that carries struct_size, or bump ST_ABI_VERSION "
              "and freeze the new headers under tests/abi/v<N>.")
        return 1
    grown = [n for n in fs if cs[n][0] > fs[n][0]]
    print("ABI v%s layout unchanged: %d structs, %d members, %d constants%s" % (
        abi_f[0], len(fs), n_members, len(fr) - n_members,
        "; grown by appending: " + ", ".join(grown) if grown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
