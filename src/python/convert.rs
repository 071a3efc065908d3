//! Values across the boundary: results as the dict, list, str, float,
//! int, bool or None that `json.loads` would give, built directly; option
//! dicts as TOML tables.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use serde_json::Value;

/// `value` as a Python object (objects keep their key order).
pub(crate) fn to_py(py: Python<'_>, value: &Value) -> PyResult<PyObject> {
    match value {
        Value::Null => Ok(py.None()),
        Value::Bool(b) => b.into_py_any(py),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_py_any(py),
            (None, Some(u)) => u.into_py_any(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_py_any(py),
        },
        Value::String(s) => s.into_py_any(py),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_py_any(py)
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_py_any(py)
        }
    }
}

/// Any serialisable value as a Python object (see [`to_py`]).
pub(crate) fn serialize_to_py<T: serde::Serialize>(
    py: Python<'_>,
    value: &T,
) -> PyResult<PyObject> {
    let value = serde_json::to_value(value)
        .map_err(|e| crate::Error::invalid("value", e.to_string(), "a serialisable value"))?;
    to_py(py, &value)
}

/// A dict of options (a configuration or its overrides) as a TOML table:
/// None values are left out (unset), paths become strings.
pub(crate) fn table_from_py(dict: &Bound<'_, PyDict>) -> PyResult<toml::Table> {
    let mut table = toml::Table::new();
    for (k, v) in dict.iter() {
        let key: String = k.extract()?;
        if let Some(value) = toml_from_py(&key, &v)? {
            table.insert(key, value);
        }
    }
    Ok(table)
}

fn toml_from_py(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Option<toml::Value>> {
    if v.is_none() {
        return Ok(None);
    }
    // numpy's scalars (np.int64(2), np.float32(0.5), np.bool_(True)) and
    // arrays are taken as the Python values they stand for.
    let numpy = v.get_type().module().is_ok_and(|m| m == "numpy");
    if numpy && v.get_type().name().is_ok_and(|n| n == "ndarray") {
        return toml_from_py(key, &v.call_method0("tolist")?);
    }
    let value = if let Ok(b) = v.downcast::<PyBool>() {
        toml::Value::Boolean(b.is_true())
    } else if numpy
        && v.get_type()
            .name()
            .is_ok_and(|n| n.to_string().starts_with("bool"))
    {
        toml::Value::Boolean(v.is_truthy()?)
    } else if v.is_instance_of::<PyInt>() || (numpy && v.hasattr("__index__")?) {
        let i = v.call_method0("__index__")?;
        toml::Value::Integer(i.extract().map_err(|_| {
            crate::Error::invalid(key, i.to_string(), "an integer from -2**63 to 2**63 - 1")
        })?)
    } else if v.is_instance_of::<PyFloat>() || (numpy && v.hasattr("__float__")?) {
        toml::Value::Float(v.extract()?)
    } else if let Ok(s) = v.downcast::<PyString>() {
        toml::Value::String(s.to_str()?.to_string())
    } else if let Ok(d) = v.downcast::<PyDict>() {
        toml::Value::Table(table_from_py(d)?)
    } else if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for item in v.try_iter()? {
            let item = item?;
            match toml_from_py(key, &item)? {
                Some(x) => items.push(x),
                None => return Err(bad_value(key, v)),
            }
        }
        toml::Value::Array(items)
    } else if let Ok(path) = v.py().import("os")?.call_method1("fspath", (v,)) {
        toml::Value::String(path.extract()?)
    } else {
        return Err(bad_value(key, v));
    };
    Ok(Some(value))
}

fn bad_value(key: &str, v: &Bound<'_, PyAny>) -> PyErr {
    let shown = v.repr().map_or_else(|_| "?".to_string(), |r| r.to_string());
    crate::Error::invalid(key, shown, "a bool, int, float, str, path, list or dict").into()
}

/// An argument `arg` that must be an integer >= 0: pyo3's own conversion
/// to `u64` raises an OverflowError naming nothing for a negative int.
fn unsigned(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    let range = "an integer from 0 to 2**64 - 1";
    let v: i128 = match obj.extract() {
        Ok(v) => v,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => {
            return Err(crate::Error::invalid(arg, obj.str()?, range).into());
        }
        Err(_) => {
            let got = obj
                .get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string());
            let message = format!("{arg}: expected an integer, got {got}");
            return Err(pyo3::exceptions::PyTypeError::new_err(message));
        }
    };
    let expected = if v < 0 { "an integer >= 0" } else { range };
    u64::try_from(v).map_err(|_| crate::Error::invalid(arg, v, expected).into())
}

/// `seed` (`#[pyo3(from_py_with = ...)]`): an integer >= 0.
pub(crate) fn seed_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    unsigned(obj, "seed")
}

/// `seed`, or None.
pub(crate) fn optional_seed_arg(obj: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    if obj.is_none() {
        Ok(None)
    } else {
        unsigned(obj, "seed").map(Some)
    }
}

/// `split_seed`: an integer >= 0.
pub(crate) fn split_seed_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    unsigned(obj, "split_seed")
}

/// `epoch`: an integer >= 0.
pub(crate) fn epoch_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    unsigned(obj, "epoch")
}

/// `member`: an integer >= 0.
pub(crate) fn member_arg(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let v = unsigned(obj, "member")?;
    usize::try_from(v).map_err(|_| crate::Error::invalid("member", v, "a smaller integer").into())
}

/// A count from Python: negative values are argument errors (saying
/// `expected`), not overflows.
pub(crate) fn count(arg: &str, v: i64, expected: &str) -> crate::Result<usize> {
    usize::try_from(v).map_err(|_| crate::Error::invalid(arg, v, expected))
}
