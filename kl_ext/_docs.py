"""The arguments the row losses share, explained once and written into each loss's docstring (so that
`help(kl_ext.tvd_with_logits)` states every argument, not "as kl_div_with_logits")."""

ARGS = {
    "input": "the student's raw logits, (..., V): rows are the leading dims (read in place when strided), the "
             "classes the last. q = softmax(input / T).",
    "target": "the teacher, the shape of input: logits, log-probabilities or probabilities, as target_type says.",
    "target_type": '"logits" (p = softmax(target / T)), "log_probs" or "probs" (p = exp(target) or target, used '
                   "exactly as given).",
    "temperature": "T > 0. The student's logits are always divided by T; the teacher's are divided by T only when "
                   'target_type="logits" (log-probs and probs are used as given). The loss is the plain '
                   "divergence: Hinton's T**2 gradient scaling is the caller's to apply.",
    "reduction": '"batchmean" (sum / rows counted: per token for (B, T, V)), "sum", "mean" (sum / (rows counted '
                 '* V)), or "none" (the per-row loss, of the leading shape).',
    "mask": "optional bool tensor of the leading shape; False rows give 0 loss and 0 gradient and are not counted.",
    "labels, ignore_index": "optional integer labels of the leading shape; rows whose label is ignore_index "
                            "(default -100) are left out as a False mask would (combined with mask when both are "
                            "given), as TRL and Liger take them.",
    "backend": '"auto" (CPU tensors: the C++ kernels; CUDA tensors: Triton, else the CUDA kernels; the '
               'KL_EXT_BACKEND variable overrides), "cpu", "cuda", "triton", or "torch": the pure-PyTorch '
               "reference (any device, double backward).",
    "validate": "check values for the classic mistakes (probabilities passed as logits, NaN, ...) and raise a "
                "ValueError saying what to do; it syncs with the device, so it is off by default.",
}
ROW_LOSS = ("input", "target", "target_type", "temperature", "reduction", "mask", "labels, ignore_index", "backend",
            "validate")
PLACEHOLDER = "{common_args}"


def _wrap(name: str, text: str, indent: str, width: int = 116) -> str:
    lines, line = [], f"{indent}{name}:"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = f"{indent}    {word}"
        else:
            line += f" {word}"
    return "\n".join(lines + [line])


def with_args(*names: str):
    """Decorator: replace the line `{common_args}` of the docstring with these shared arguments' explanations
    (default: every row-loss argument), at that line's indentation."""
    names = names or ROW_LOSS

    def deco(fn):
        doc = fn.__doc__
        line = next(ln for ln in doc.splitlines() if ln.strip() == PLACEHOLDER)
        indent = line[:len(line) - len(line.lstrip())]
        fn.__doc__ = doc.replace(line, "\n".join(_wrap(n, ARGS[n], indent) for n in names))
        return fn
    return deco
