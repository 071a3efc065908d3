//! Input checks of the loss, with messages that name the argument, what was
//! seen and what was expected.

use tch::{Kind, Tensor};

use super::GroupLossOptions;
use crate::error::{ensure, Error, Result};
use crate::names::{device_name, dtype_name};

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

/// A strided (dense) tensor: sparse and mkldnn layouts lack most ops used here.
pub(crate) fn check_dense(t: &Tensor, arg: &str) -> Result<()> {
    ensure(
        !t.is_sparse() && !t.is_mkldnn(),
        arg,
        || "a sparse or mkldnn tensor".to_string(),
        "a dense (strided) tensor",
    )
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
    ensure(
        is_float(t.kind()),
        arg,
        || format!("dtype {}", dtype_name(t.kind())),
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
    let finite = bool::try_from(t.isfinite().all())?;
    if !finite {
        let nan = i64::try_from(t.isnan().sum(Kind::Int64))?;
        let inf = i64::try_from(t.isinf().sum(Kind::Int64))?;
        return Err(not_finite(arg, nan, inf));
    }
    Ok(())
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
    check_dense(labels, "labels")?;
    ensure(
        labels.dim() == 1,
        "labels",
        || format!("a tensor of shape {}", shape(labels)),
        "a 1-D tensor of class indices",
    )?;
    ensure(
        is_integer(labels.kind()),
        "labels",
        || format!("dtype {}", dtype_name(labels.kind())),
        "an integer dtype",
    )?;
    if let Some(n) = n {
        ensure(
            labels.size()[0] == n,
            "labels",
            || format!("{} labels", labels.size()[0]),
            format!("one label per embedding ({n})"),
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
    let t = opts.temperature;
    ensure(
        t.is_finite() && t > 0.0,
        "temperature",
        || format!("{t}"),
        "a finite number > 0",
    )?;
    ensure(
        opts.num_anchors >= 0,
        "num_anchors",
        || format!("{}", opts.num_anchors),
        "an integer >= 0",
    )?;
    ensure(
        opts.num_iters >= 1,
        "num_iters",
        || format!("{}", opts.num_iters),
        "an integer >= 1",
    )?;
    for (name, w) in [
        ("gtg_weight", opts.gtg_weight),
        ("ce_weight", opts.ce_weight),
    ] {
        ensure(
            w.is_finite() && w >= 0.0,
            name,
            || format!("{w}"),
            "a finite number >= 0",
        )?;
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
    ensure(
        logits.device() == emb.device(),
        "logits",
        || format!("device {}", device_name(logits.device())),
        format!("the device of embeddings ({})", device_name(emb.device())),
    )?;
    ensure(
        labels.device() == emb.device(),
        "labels",
        || format!("device {}", device_name(labels.device())),
        format!("the device of embeddings ({})", device_name(emb.device())),
    )?;
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
