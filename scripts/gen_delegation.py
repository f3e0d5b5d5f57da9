#!/usr/bin/env python3
"""Parse Burn's backend op traits (burn-backend sources) into method signatures.

Used by the delegation generator; see `main` below.
"""
import re, sys, os, glob, json

def strip_comments(src):
    src = re.sub(r'/\*.*?\*/', '', src, flags=re.S)
    return re.sub(r'//[^\n]*', '', src)

def match_close(s, i, open_c, close_c):
    depth = 0
    while i < len(s):
        c = s[i]
        if c == open_c: depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0: return i
        i += 1
    raise ValueError("unbalanced")

def split_top(s, sep=','):
    out, depth, cur = [], 0, ''
    i = 0
    while i < len(s):
        c = s[i]
        if c in '(<[{': depth += 1
        elif c in ')]}': depth -= 1
        elif c == '>' and not (i > 0 and s[i-1] == '-'): depth -= 1
        if c == sep and depth == 0:
            out.append(cur.strip()); cur = ''
        else:
            cur += c
        i += 1
    if cur.strip(): out.append(cur.strip())
    return out

def parse_trait(src, trait):
    src = strip_comments(src)
    m = re.search(r'pub trait ' + trait + r'\s*<[^{]*\{', src)
    if not m: raise SystemExit(f"trait {trait} not found")
    start = m.end() - 1
    end = match_close(src, start, '{', '}')
    body = src[start+1:end]
    methods = []
    i = 0
    while True:
        m = re.search(r'\bfn\s+([a-z_0-9]+)\s*', body[i:])
        if not m: break
        name = m.group(1)
        j = i + m.end()
        generics = ''
        if body[j] == '<':
            k = j; depth = 0
            while True:
                if body[k] == '<': depth += 1
                elif body[k] == '>' and body[k-1] != '-': depth -= 1
                if depth == 0: break
                k += 1
            generics = body[j+1:k]; j = k + 1
        while body[j].isspace(): j += 1
        assert body[j] == '(', (name, body[j:j+20])
        pe = match_close(body, j, '(', ')')
        params = split_top(body[j+1:pe])
        k = pe + 1
        # return type up to ';' or '{' or 'where'
        rest_start = k
        depth = 0
        while True:
            c = body[k]
            if c in '(<[' : depth += 1
            elif c in ')]': depth -= 1
            elif c == '>' and body[k-1] != '-': depth -= 1
            if depth == 0 and (c == ';' or c == '{'): break
            k += 1
        sig_tail = body[rest_start:k].strip()
        where = ''
        if ' where' in ' ' + sig_tail or sig_tail.startswith('where'):
            idx = sig_tail.find('where')
            where = sig_tail[idx+5:].strip()
            sig_tail = sig_tail[:idx].strip()
        ret = sig_tail[2:].strip() if sig_tail.startswith('->') else ''
        has_default = body[k] == '{'
        if has_default:
            k = match_close(body, k, '{', '}')
        args = []
        for p in params:
            if ':' not in p: continue
            n, t = p.split(':', 1)
            args.append((n.strip(), ' '.join(t.split())))
        methods.append(dict(name=name, generics=' '.join(generics.split()), args=args,
                            ret=' '.join(ret.split()), where=' '.join(where.split()),
                            default=has_default))
        i = k + 1
    return methods

TRAITS = [
    ("tensor.rs", "FloatTensorOps"), ("int_tensor.rs", "IntTensorOps"),
    ("bool_tensor.rs", "BoolTensorOps"), ("modules/base.rs", "ModuleOps"),
    ("activation.rs", "ActivationOps"), ("qtensor.rs", "QTensorOps"),
    ("transaction.rs", "TransactionOps"),
]

def load_all(ops_dir):
    out = {}
    for f, t in TRAITS:
        with open(os.path.join(ops_dir, f)) as fh:
            out[t] = parse_trait(fh.read(), t)
    return out

if __name__ == '__main__' and len(sys.argv) > 1 and sys.argv[1] == 'dump':
    d = load_all(sys.argv[2])
    types = {}
    for t, ms in d.items():
        for m in ms:
            for n, ty in m['args']:
                types.setdefault(ty, []).append(m['name'])
            types.setdefault('RET ' + m['ret'], []).append(m['name'])
            if m['generics'] or m['where']:
                print('GENERIC', t, m['name'], m['generics'], m['where'])
    for ty, ns in sorted(types.items()):
        print(f"{len(ns):4} {ty}   e.g. {ns[0]}")


# ---------------------------------------------------------------------------------------------
# Code generation: one `macro_rules!` per op trait, delegating every method that the
# hand-written impl in `src/backend/` does not define itself.
# ---------------------------------------------------------------------------------------------

HANDWRITTEN = {
    "FloatTensorOps": "src/backend/float.rs", "IntTensorOps": "src/backend/delegated.rs",
    "BoolTensorOps": "src/backend/delegated.rs", "ModuleOps": "src/backend/module.rs",
    "ActivationOps": "src/backend/delegated.rs", "QTensorOps": "src/backend/quantized.rs",
    "TransactionOps": "src/backend/transaction.rs",
}

# Forward ops that read a model's weights (with `float_matmul`, `linear` and `embedding`, written
# by hand): each first reports parameters that lost their host placement (`src/mark.rs`).
FORWARD_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
               "conv_transpose3d", "deform_conv2d"}

# Float ops whose inner result may be a view of (or be) an input: where an input was a copy-engine
# ring region handed out during the op, the result is copied out of the ring
# (`OffloadBackend::unalias`), since the region is overwritten once released. The view ops written
# by hand (reshape, slice, ...) do the same in `view_or`.
ALIAS_OPS = {"float_unfold", "float_repeat_dim", "float_cat"}

# Struct returns converted field by field (see `src/backend/convert.rs`).
STRUCT_RETURNS = {"MaxPool1dWithIndices", "MaxPool2dWithIndices", "MaxPool1dBackward",
                  "MaxPool2dBackward", "DeformConv2dBackward"}

def outer_type(ty):
    """The type as written in our impl: the trait's `B` is our `Self`."""
    ty = re.sub(r'\bcrate::tensor::', '', ty)
    return re.sub(r'<B>', '<Self>', ty)

def convert_arg(name, ty):
    if ty == 'FloatTensor<B>': return f'Self::fetch({name})'
    if ty == 'Vec<FloatTensor<B>>': return f'{name}.into_iter().map(Self::fetch).collect()'
    if ty == 'Option<FloatTensor<B>>': return f'{name}.map(Self::fetch)'
    if ty == '&Device<B>': return f'{name}.compute()'
    if ty == 'TensorPrimitive<B>': return f'Self::fetch_primitive({name})'
    if ty == 'QuantizedTensor<B>': return f'Self::fetch_q({name})'
    if ty == 'Vec<QuantizedTensor<B>>': return f'{name}.into_iter().map(Self::fetch_q).collect()'
    if ty == 'QuantizationParametersPrimitive<B>':
        return f'QuantizationParametersPrimitive {{ scales: Self::fetch({name}.scales) }}'
    if 'FloatTensor' in ty or 'QuantizedTensor' in ty or 'Device<B>' in ty or 'TransactionPrimitive' in ty:
        raise SystemExit(f"no conversion for argument type {ty}: write the method by hand")
    return name

def convert_ret(expr, ty):
    if ty == 'FloatTensor<B>': return f'Self::resident({expr})'
    if ty == 'Device<B>': return f'OffloadDevice::Device({expr})'
    if ty == 'TensorPrimitive<B>': return f'Self::wrap_primitive({expr})'
    if ty == 'QuantizedTensor<B>': return f'Self::resident_q({expr})'
    m = re.fullmatch(r'(\w+)<B>', ty)
    if m and m.group(1) in STRUCT_RETURNS: return f'FromInner::from_inner({expr})'
    if ty.startswith('('):
        parts = split_top(ty[1:-1])
        names = [f'r{i}' for i in range(len(parts))]
        conv = ', '.join(convert_ret(n, t) for n, t in zip(names, parts))
        return f'{{ let ({", ".join(names)}) = {expr}; ({conv}) }}'
    if 'FloatTensor' in ty or 'QuantizedTensor' in ty or 'Device<B>' in ty:
        raise SystemExit(f"no conversion for return type {ty}: write the method by hand")
    return expr

def handwritten_names(path):
    if not os.path.exists(path): return set()
    return set(re.findall(r'\bfn\s+([a-z_0-9]+)\s*\(', strip_comments(open(path).read())))

def emit(traits, root):
    out = ["// @generated by scripts/gen_delegation.py from burn-backend's op traits: do not edit.",
           "// Regenerate with `python3 scripts/gen_delegation.py`; CI checks it is up to date.",
           "//",
           "// One macro per op trait. Each expands, inside `impl XOps<Self> for OffloadBackend<B>`,",
           "// to a delegation of every method that the hand-written impl does not define, including",
           "// the methods with default bodies, so that no specialisation of `B` is lost.", ""]
    for trait, methods in traits.items():
        skip = handwritten_names(os.path.join(root, HANDWRITTEN[trait]))
        macro = 'delegate_' + re.sub(r'(?<!^)([A-Z])', r'_\1', trait).lower()
        out.append(f"/// Delegates the `{trait}` methods not written by hand to the inner backend.")
        out.append(f"macro_rules! {macro} {{")
        out.append("    () => {")
        for m in methods:
            if m['name'] in skip: continue
            params = ', '.join(f"{n}: {outer_type(t)}" for n, t in m['args'])
            ret = f" -> {outer_type(m['ret'])}" if m['ret'] else ''
            call = f"B::{m['name']}({', '.join(convert_arg(n, t) for n, t in m['args'])})"
            out.append(f"        fn {m['name']}({params}){ret} {{")
            if m['name'] in FORWARD_OPS:
                out.append("            crate::mark::check_lost();")
            if m['name'] in ALIAS_OPS:
                if m['ret'] != 'FloatTensor<B>':
                    raise SystemExit(f"{m['name']}: ALIAS_OPS must return FloatTensor<B>")
                out.append("            let takes = crate::prefetch::ring_takes();")
                out.append(f"            Self::resident(Self::unalias({call}, takes))")
            else:
                out.append(f"            {convert_ret(call, m['ret'])}")
            out.append("        }")
        out.append("    };")
        out.append("}")
        out.append(f"pub(crate) use {macro};")
        out.append("")
    return '\n'.join(out)

def find_ops_dir():
    import subprocess
    meta = json.loads(subprocess.check_output(
        ['cargo', 'metadata', '--format-version', '1'], text=True))
    for p in meta['packages']:
        if p['name'] == 'burn-backend':
            return os.path.join(os.path.dirname(p['manifest_path']), 'src', 'backend', 'ops')
    raise SystemExit("burn-backend not found in `cargo metadata`")

if __name__ == '__main__' and (len(sys.argv) == 1 or sys.argv[1] in ('--check', '--write')):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    code = emit(load_all(find_ops_dir()), root)
    target = 'src/backend/generated.rs'
    import subprocess
    code = subprocess.run(['rustfmt', '--edition', '2024', '--emit', 'stdout', '--quiet'],
                          input=code, capture_output=True, text=True, check=True).stdout
    if len(sys.argv) > 1 and sys.argv[1] == '--check':
        if open(target).read() != code:
            raise SystemExit(f"{target} is stale: run `python3 scripts/gen_delegation.py`")
        print(f"{target} is up to date")
    else:
        open(target, 'w').write(code)
        print(f"wrote {target}")
