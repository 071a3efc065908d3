//! Argument checks and the preparation of embeddings shared by the metrics.

use tch::{Device, Kind, Tensor};

use crate::error::{ensure, Result};
use crate::loss::checks::{check_label_vector, check_matrix, label_noun};

/// Bytes one block of similarities (or distances) may take when the caller
/// gives no block size: large enough for efficient matrix products, small
/// enough to keep the whole evaluation far below the memory of a laptop.
pub(crate) const BLOCK_BYTES: i64 = 128 << 20;

/// The dtype the metrics compute in: float64 stays float64, every other
/// floating dtype (float32, and the halves, whose sums would round) is float32.
pub(crate) fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Bytes per element of `kind` (float32 or float64).
pub(crate) fn elt_size(kind: Kind) -> i64 {
    if kind == Kind::Double {
        8
    } else {
        4
    }
}

/// The dtype a gallery and its queries are computed in together: float64
/// when either is float64 (the other widens exactly), else float32.
pub(crate) fn shared_compute_kind(gallery: &Tensor, query: Option<&Tensor>) -> Kind {
    let double = query.is_some_and(|q| q.kind() == Kind::Double);
    compute_kind(if double { Kind::Double } else { gallery.kind() })
}

/// A contiguous copy (or view) of `x` in `kind` (a compute dtype), detached
/// from autograd, with rows scaled to unit length when `normalize` is set
/// (zero rows stay zero, see [`normalize_rows_`]).
pub(crate) fn prepare(x: &Tensor, kind: Kind, normalize: bool) -> Tensor {
    let x = x.detach().to_kind(kind);
    if !normalize {
        return x.contiguous();
    }
    let y = &x / row_peaks(&x);
    (&y / row_norms(&y)).contiguous()
}

/// Scales the rows of `rows` (float32 or float64) to unit length in place,
/// zero rows staying zero. Rows are first divided by their largest
/// magnitude, so rows of any size (1e-30 or 1e30 in float32, whose squares
/// underflow or overflow; down to 1e-308 in float64) keep their direction.
pub(crate) fn normalize_rows_(rows: &mut Tensor) {
    let peaks = row_peaks(rows);
    let _ = rows.g_div_(&peaks);
    let norms = row_norms(rows);
    let _ = rows.g_div_(&norms);
}

/// Every row's largest magnitude (n x 1), at least the dtype's smallest
/// normal number (zero rows divide by it and stay zero).
fn row_peaks(x: &Tensor) -> Tensor {
    let smallest_normal = if x.kind() == Kind::Double {
        f64::MIN_POSITIVE
    } else {
        f32::MIN_POSITIVE as f64
    };
    x.abs()
        .amax([1i64].as_slice(), true)
        .clamp_min(smallest_normal)
}

/// Every row's L2 norm (n x 1), at least 1e-12.
fn row_norms(x: &Tensor) -> Tensor {
    x.norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12)
}

/// A host vector of the elements of `t` (any device, any shape) as `T`.
pub(crate) fn host_vec<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let flat = t
        .to_device(Device::Cpu)
        .to_kind(T::KIND)
        .contiguous()
        .reshape([-1]);
    Ok(Vec::<T>::try_from(&flat)?)
}

/// Embeddings: a dense 2-D floating tensor with finite values and at least
/// `min_rows` rows.
pub(crate) fn check_embeddings(x: &Tensor, arg: &str, min_rows: i64) -> Result<()> {
    check_matrix(x, arg, "samples x embedding dims")?;
    let n = x.size()[0];
    ensure(
        n >= min_rows,
        arg,
        || format!("{n} sample(s)"),
        format!("at least {min_rows} samples"),
    )
}

/// Integer labels of rank 1 (any values), one per row of `of` (`n` rows),
/// as a host vector.
pub(crate) fn labels_vec(labels: &Tensor, arg: &str, n: Option<(i64, &str)>) -> Result<Vec<i64>> {
    check_label_vector(
        labels,
        arg,
        "a 1-D tensor of integer labels",
        n.map(|(n, of)| {
            let noun = label_noun(arg, false);
            (n, format!("one {noun} per row of {of} ({n})"))
        }),
    )?;
    host_vec::<i64>(labels)
}

/// `1 <= k <= max`, `max` being `what` (in the message).
pub(crate) fn check_k(k: i64, max: i64, what: &str) -> Result<()> {
    ensure(
        k >= 1 && k <= max,
        "k",
        || k.to_string(),
        format!("1 <= k <= {max}, {what}"),
    )
}

/// An optional block size: `None` or an integer >= 1.
pub(crate) fn check_batch_size(batch_size: Option<i64>) -> Result<()> {
    if let Some(b) = batch_size {
        ensure(
            b >= 1,
            "batch_size",
            || b.to_string(),
            "None or an integer >= 1",
        )?;
    }
    Ok(())
}

/// Rows per block so that `rows x cols` elements of `kind` take about
/// [`BLOCK_BYTES`], unless the caller chose a block size.
pub(crate) fn block_rows(batch_size: Option<i64>, cols: i64, kind: Kind) -> i64 {
    batch_size
        .unwrap_or_else(|| BLOCK_BYTES / (cols.max(1) * elt_size(kind)))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_normalises_rows_and_keeps_zero_rows() {
        let x = Tensor::from_slice(&[3.0f64, 4.0, 0.0, 0.0]).reshape([2, 2]);
        let p = prepare(&x, Kind::Double, true);
        assert_eq!(host_vec::<f64>(&p).unwrap(), vec![0.6, 0.8, 0.0, 0.0]);
        assert_eq!(p.kind(), Kind::Double);
        let half = x.to_kind(Kind::Half);
        assert_eq!(shared_compute_kind(&half, None), Kind::Float);
        assert_eq!(shared_compute_kind(&half, Some(&x)), Kind::Double);
        assert_eq!(shared_compute_kind(&x, Some(&half)), Kind::Double);
        // float32 rows whose squared norm overflows or underflows.
        let big = Tensor::from_slice(&[3e30f32, 4e30, 3e-30, -4e-30]).reshape([2, 2]);
        let p = host_vec::<f32>(&prepare(&big, Kind::Float, true)).unwrap();
        for (got, want) in p.iter().zip([0.6f32, 0.8, 0.6, -0.8]) {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
        // float64 rows far below float32's range.
        let tiny = Tensor::from_slice(&[3e-300f64, -4e-300]).reshape([1, 2]);
        let p = host_vec::<f64>(&prepare(&tiny, Kind::Double, true)).unwrap();
        assert!(
            (p[0] - 0.6).abs() < 1e-12 && (p[1] + 0.8).abs() < 1e-12,
            "{p:?}"
        );
    }

    #[test]
    fn labels_are_checked() {
        let y = Tensor::from_slice(&[1.0f32, 2.0]);
        let e = labels_vec(&y, "labels", None).unwrap_err().to_string();
        assert!(e.starts_with("labels: expected an integer dtype"), "{e}");
        let y = Tensor::from_slice(&[-4i32, 7]);
        let e = labels_vec(&y, "labels", Some((3, "embeddings")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "labels: expected one label per row of embeddings (3), got 2 labels"
        );
        assert_eq!(labels_vec(&y, "labels", None).unwrap(), vec![-4, 7]);
        let e = labels_vec(&y, "gallery_ids", Some((3, "embeddings")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "gallery_ids: expected one id per row of embeddings (3), got 2 ids"
        );
    }
}
