//! Input checks of the loss, with messages that name the argument, what was
//! seen and what was expected.

use tch::{Kind, Tensor};

use super::GroupLossOptions;
use crate::error::{at_least, ensure, Error, Result};
use crate::names::{dtype_name, has_own_data, is_supported_device, tensor_device_name};

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

pub(crate) fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    )
}

/// `[a, b]` for messages.
pub(crate) fn shape(t: &Tensor) -> String {
    format!("{:?}", t.size())
}

/// A strided (dense) tensor with data on the CPU or a CUDA device: sparse
/// and mkldnn layouts lack most ops used here, a `meta` tensor has no data,
/// the other devices (`mps`, `xpu`) are not supported, and the tensors of
/// torch.func's transforms and of torch.export's tracing hold no data.
pub(crate) fn check_dense(t: &Tensor, arg: &str) -> Result<()> {
    ensure(
        is_supported_device(t),
        arg,
        || format!("a tensor on {}", tensor_device_name(t)),
        "a tensor on cpu or cuda",
    )?;
    ensure(
        has_own_data(t),
        arg,
        || {
            "a wrapper without data (torch.func's vmap, grad, jacrev and jacfwd, and torch.export, are not supported)".into()
        },
        "a tensor with data",
    )?;
    ensure(
        !t.is_sparse() && !t.is_mkldnn(),
        arg,
        || "a sparse or mkldnn tensor".to_string(),
        "a dense (strided) tensor",
    )
}

/// `t`'s dtype is one of those `ok` accepts, which `expected` names.
pub(crate) fn check_dtype(
    t: &Tensor,
    arg: &str,
    ok: impl Fn(Kind) -> bool,
    expected: &str,
) -> Result<()> {
    ensure(
        ok(t.kind()),
        arg,
        || format!("dtype {}", dtype_name(t.kind())),
        expected,
    )
}

/// Every tensor of `others` (argument, tensor) is on the device of
/// `reference`, argument `ref_arg`.
pub(crate) fn check_same_device(
    ref_arg: &str,
    reference: &Tensor,
    others: &[(&str, &Tensor)],
) -> Result<()> {
    let device = reference.device();
    for &(arg, t) in others {
        ensure(
            t.device() == device,
            arg,
            || format!("device {}", tensor_device_name(t)),
            format!(
                "the device of {ref_arg} ({})",
                tensor_device_name(reference)
            ),
        )?;
    }
    Ok(())
}

/// A floating tensor of rank 2 with no NaN or Inf.
pub(crate) fn check_matrix(t: &Tensor, arg: &str, what: &str) -> Result<()> {
    check_matrix_shape(t, arg, what)?;
    check_finite(t, arg)
}

/// A dense floating tensor of rank 2 with at least one column (reads no data).
pub(crate) fn check_matrix_shape(t: &Tensor, arg: &str, what: &str) -> Result<()> {
    check_dense(t, arg)?;
    ensure(
        t.dim() == 2,
        arg,
        || format!("a tensor of shape {}", shape(t)),
        format!("a 2-D tensor ({what})"),
    )?;
    check_dtype(
        t,
        arg,
        is_float,
        "a floating-point dtype (float16, bfloat16, float32 or float64)",
    )?;
    ensure(
        t.size()[1] >= 1,
        arg,
        || format!("a tensor of shape {}", shape(t)),
        format!("at least one column ({what})"),
    )
}

/// No NaN or Inf.
pub(crate) fn check_finite(t: &Tensor, arg: &str) -> Result<()> {
    if t.numel() == 0 {
        return Ok(());
    }
    // One reduction first: a NaN or Inf anywhere makes the sum NaN or Inf,
    // so a finite sum proves every value finite (40 times cheaper than
    // `isfinite().all()` on a CPU). A sum that overflows, or non-finite
    // values, take the full check.
    // Half sums in float32: half's range (65504) is passed by the sum of
    // many ordinary values.
    let kind = match t.kind() {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    };
    if bool::try_from(t.sum(kind).isfinite())? {
        return Ok(());
    }
    if bool::try_from(t.isfinite().all())? {
        return Ok(());
    }
    Err(count_not_finite(t, arg))
}

/// The error for `t`'s non-finite values (`arg`), counted.
pub(crate) fn count_not_finite(t: &Tensor, arg: &str) -> Error {
    let nan = i64::try_from(t.isnan().sum(Kind::Int64)).unwrap_or(-1);
    let inf = i64::try_from(t.isinf().sum(Kind::Int64)).unwrap_or(-1);
    not_finite(arg, nan, inf)
}

/// The error for `nan` NaN and `inf` Inf values in `arg`.
pub(crate) fn not_finite(arg: &str, nan: i64, inf: i64) -> Error {
    Error::invalid(
        arg,
        format!("{nan} NaN and {inf} Inf values"),
        "finite values",
    )
}

/// Integer labels of rank 1 with values in `[0, num_classes)`.
pub(crate) fn check_labels(
    labels: &Tensor,
    n: Option<i64>,
    num_classes: Option<i64>,
) -> Result<()> {
    check_labels_shape(labels, n)?;
    if labels.numel() > 0 {
        let lo = i64::try_from(labels.min())?;
        let hi = i64::try_from(labels.max())?;
        check_label_range(lo, hi, num_classes)?;
    }
    Ok(())
}

/// `lo` and `hi`, the smallest and largest label, lie in `[0, num_classes)`.
pub(crate) fn check_label_range(lo: i64, hi: i64, num_classes: Option<i64>) -> Result<()> {
    ensure(lo >= 0, "labels", || format!("a label {lo}"), "labels >= 0")?;
    if let Some(m) = num_classes {
        ensure(
            hi < m,
            "labels",
            || format!("a label {hi}"),
            format!("labels < num_classes ({m})"),
        )?;
    }
    Ok(())
}

/// Dense integer labels of rank 1, `n` of them if given (reads no data).
pub(crate) fn check_labels_shape(labels: &Tensor, n: Option<i64>) -> Result<()> {
    check_label_vector(
        labels,
        "labels",
        "a 1-D tensor of class indices",
        n.map(|n| (n, format!("one label per embedding ({n})"))),
    )
}

/// What argument `arg` (labels, or ids: `ids`, `query_ids`) holds, in the
/// `plural` or singular.
pub(crate) fn label_noun(arg: &str, plural: bool) -> &'static str {
    match (arg.ends_with("ids"), plural) {
        (true, true) => "ids",
        (true, false) => "id",
        (false, true) => "labels",
        (false, false) => "label",
    }
}

/// Argument `arg` holds dense integer labels of rank 1 (reads no data).
/// `what` describes the 1-D tensor expected; `count`, if given, is the
/// number of labels expected and how the message puts it.
pub(crate) fn check_label_vector(
    labels: &Tensor,
    arg: &str,
    what: &str,
    count: Option<(i64, String)>,
) -> Result<()> {
    check_dense(labels, arg)?;
    ensure(
        labels.dim() == 1,
        arg,
        || format!("a tensor of shape {}", shape(labels)),
        what,
    )?;
    check_dtype(labels, arg, is_integer, "an integer dtype")?;
    if let Some((n, expected)) = count {
        ensure(
            labels.size()[0] == n,
            arg,
            || format!("{} {}", labels.size()[0], label_noun(arg, true)),
            expected,
        )?;
    }
    Ok(())
}

/// The sharpness of W: a power below 1 would give infinite gradients at
/// the clipped zeros.
pub(crate) fn check_power(power: f64) -> Result<()> {
    ensure(
        power.is_finite() && power >= 1.0,
        "similarity_power",
        || format!("{power}"),
        "a finite number >= 1",
    )
}

/// Scalar options of the loss.
pub(crate) fn check_options(opts: &GroupLossOptions) -> Result<()> {
    crate::error::positive("temperature", opts.temperature)?;
    at_least("num_anchors", opts.num_anchors, 0)?;
    at_least("num_iters", opts.num_iters, 1)?;
    for (name, w) in [
        ("gtg_weight", opts.gtg_weight),
        ("ce_weight", opts.ce_weight),
    ] {
        crate::error::non_negative(name, w)?;
    }
    check_power(opts.similarity_power)?;
    ensure(
        opts.gtg_weight > 0.0 || opts.ce_weight > 0.0,
        "gtg_weight",
        || "gtg_weight = ce_weight = 0".to_string(),
        "at least one of gtg_weight and ce_weight > 0",
    )?;
    Ok(())
}

/// Every check of [`super::group_loss`]'s inputs.
pub fn check_inputs(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
) -> Result<()> {
    check_structure(emb, logits, labels, opts)?;
    check_finite(emb, "embeddings")?;
    check_finite(logits, "logits")?;
    check_labels(labels, None, Some(logits.size()[1]))
}

/// The checks of [`check_inputs`] that read no tensor data: options, shapes,
/// dtypes and devices.
pub(crate) fn check_structure(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
) -> Result<()> {
    check_options(opts)?;
    check_matrix_shape(emb, "embeddings", "batch x embedding dims")?;
    let n = emb.size()[0];
    ensure(
        n >= 2,
        "embeddings",
        || format!("{n} sample(s)"),
        "a batch of at least 2 samples",
    )?;
    check_same_device("embeddings", emb, &[("logits", logits), ("labels", labels)])?;
    check_matrix_shape(logits, "logits", "batch x classes")?;
    ensure(
        logits.size()[0] == n,
        "logits",
        || format!("{} rows", logits.size()[0]),
        format!("one row per embedding ({n})"),
    )?;
    check_labels_shape(labels, Some(n))
}

/// `logits` has one column per class of the loss.
pub fn check_logits_width(logits: &Tensor, num_classes: i64) -> Result<()> {
    let width = if logits.dim() == 2 {
        logits.size()[1]
    } else {
        -1
    };
    ensure(
        width == num_classes,
        "logits",
        || format!("shape {}", shape(logits)),
        format!("{num_classes} columns, one per class (num_classes)"),
    )
}
