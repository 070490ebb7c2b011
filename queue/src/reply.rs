//! Reading Redis replies without trusting their shape.

use std::collections::HashMap;

use redis::Value;

use crate::error::QueueError;

/// A scalar reply as text (nil → None).
pub(crate) fn opt_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        Value::Okay => Some("OK".to_string()),
        Value::Boolean(b) => Some(if *b { "1" } else { "0" }.to_string()),
        _ => None,
    }
}

/// An array reply (nil → empty).
pub(crate) fn array(op: &'static str, v: Value) -> Result<Vec<Value>, QueueError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(QueueError::protocol(
            op,
            format!("expected an array, got {other:?}"),
        )),
    }
}

/// An array of scalars (as returned by the scripts).
pub(crate) fn strings(op: &'static str, v: Value) -> Result<Vec<String>, QueueError> {
    array(op, v)?
        .iter()
        .map(|x| {
            opt_string(x)
                .ok_or_else(|| QueueError::protocol(op, format!("expected a string, got {x:?}")))
        })
        .collect()
}

/// A script reply: its first element is the status word.
pub(crate) struct ScriptReply {
    op: &'static str,
    items: Vec<String>,
}

impl ScriptReply {
    pub(crate) fn parse(op: &'static str, v: Value) -> Result<Self, QueueError> {
        let items = strings(op, v)?;
        if items.is_empty() {
            return Err(QueueError::protocol(op, "empty reply"));
        }
        Ok(ScriptReply { op, items })
    }

    pub(crate) fn status(&self) -> &str {
        &self.items[0]
    }

    pub(crate) fn get(&self, i: usize) -> Result<&str, QueueError> {
        self.items.get(i).map(String::as_str).ok_or_else(|| {
            QueueError::protocol(
                self.op,
                format!("reply {:?} has no element {i}", self.items),
            )
        })
    }

    pub(crate) fn unexpected(&self) -> QueueError {
        QueueError::protocol(self.op, format!("unexpected reply {:?}", self.items))
    }
}

/// Field/value pairs as a flat array or a map (nil → None: a trimmed or deleted entry).
pub(crate) fn field_map(
    op: &'static str,
    v: Value,
) -> Result<Option<HashMap<String, String>>, QueueError> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(None),
        Value::Map(m) => m,
        Value::Array(a) => {
            if a.len() % 2 != 0 {
                return Err(QueueError::protocol(op, "odd number of field/value items"));
            }
            let mut it = a.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        other => {
            return Err(QueueError::protocol(
                op,
                format!("expected field/value pairs, got {other:?}"),
            ));
        }
    };
    let mut out = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        let k =
            opt_string(&k).ok_or_else(|| QueueError::protocol(op, "field name is not a string"))?;
        out.insert(k, opt_string(&v).unwrap_or_default());
    }
    Ok(Some(out))
}

/// One stream entry: id and fields (None when the entry no longer exists).
pub(crate) type Entry = (String, Option<HashMap<String, String>>);

/// Entries of one `[id, fields]` list.
pub(crate) fn entries(op: &'static str, v: Value) -> Result<Vec<Entry>, QueueError> {
    let mut out = Vec::new();
    for e in array(op, v)? {
        let mut parts = array(op, e)?.into_iter();
        let id = parts
            .next()
            .as_ref()
            .and_then(opt_string)
            .ok_or_else(|| QueueError::protocol(op, "stream entry without id"))?;
        let fields = match parts.next() {
            Some(f) => field_map(op, f)?,
            None => None,
        };
        out.push((id, fields));
    }
    Ok(out)
}

/// An XREAD/XREADGROUP reply: per stream key, its entries (nil reply → empty).
pub(crate) fn read_reply(
    op: &'static str,
    v: Value,
) -> Result<Vec<(String, Vec<Entry>)>, QueueError> {
    let per_stream: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m,
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for s in a {
                let mut parts = array(op, s)?.into_iter();
                match (parts.next(), parts.next()) {
                    (Some(k), Some(e)) => out.push((k, e)),
                    _ => {
                        return Err(QueueError::protocol(
                            op,
                            "stream reply without key and entries",
                        ));
                    }
                }
            }
            out
        }
        other => {
            return Err(QueueError::protocol(
                op,
                format!("expected stream replies, got {other:?}"),
            ));
        }
    };
    per_stream
        .into_iter()
        .map(|(k, e)| {
            let key = opt_string(&k)
                .ok_or_else(|| QueueError::protocol(op, "stream key is not a string"))?;
            Ok((key, entries(op, e)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_stream_replies_with_deleted_entries() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("uid"), bulk("a")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let r = read_reply("t", v).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "s");
        assert_eq!(r[0].1[0].0, "1-0");
        assert_eq!(r[0].1[0].1.as_ref().unwrap()["uid"], "a");
        assert_eq!(r[0].1[1], ("2-0".to_string(), None));
        assert!(read_reply("t", Value::Nil).unwrap().is_empty());
        assert!(read_reply("t", Value::Int(3)).is_err());
    }

    #[test]
    fn script_reply_errors_instead_of_panicking() {
        let r = ScriptReply::parse("t", Value::Array(vec![bulk("ok")])).unwrap();
        assert_eq!(r.status(), "ok");
        assert!(r.get(1).is_err());
        assert!(ScriptReply::parse("t", Value::Array(vec![])).is_err());
        assert!(ScriptReply::parse("t", Value::Array(vec![Value::Nil])).is_err());
    }
}
