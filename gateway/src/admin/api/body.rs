//! Reading JSON request bodies field by field, so every refusal names its field. A field is
//! given or left out; `null` is not a value (the schema allows none), so it is refused.

use super::error::ApiError;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Largest request body the API reads.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// Reads the whole body (at most [`MAX_BODY`]) as a JSON object.
pub(super) async fn read_object<B>(body: B) -> Result<Object, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request("body", format!("cannot read the body: {e}")))?
        .to_bytes();
    if bytes.is_empty() {
        return Err(ApiError::bad_request("body", "expected a JSON object"));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(Object(map)),
        Ok(_) => Err(ApiError::bad_request("body", "expected a JSON object")),
        Err(e) => Err(ApiError::bad_request("body", format!("invalid JSON: {e}"))),
    }
}

fn null(field: &str) -> ApiError {
    ApiError::bad_request(field, "null is not a value here; leave the field out")
}

/// A request object whose fields are taken one by one; leftovers are unknown fields.
pub(super) struct Object(Map<String, Value>);

impl Object {
    /// A required string field.
    pub(super) fn string(&mut self, field: &str) -> Result<String, ApiError> {
        self.opt_string(field)?
            .ok_or_else(|| ApiError::bad_request(field, "is required"))
    }

    pub(super) fn opt_string(&mut self, field: &str) -> Result<Option<String>, ApiError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Null) => Err(null(field)),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad_request(field, "must be a string")),
        }
    }

    pub(super) fn opt_strings(&mut self, field: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Null) => Err(null(field)),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(ApiError::bad_request(
                        format!("{field}[{i}]"),
                        "must be a string",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(ApiError::bad_request(field, "must be a list of strings")),
        }
    }

    /// An optional field of any deserialisable type.
    pub(super) fn opt<T: DeserializeOwned>(&mut self, field: &str) -> Result<Option<T>, ApiError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Null) => Err(null(field)),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ApiError::bad_request(field, e.to_string())),
        }
    }

    /// Refuses any field not taken.
    pub(super) fn finish(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            Some(k) => Err(ApiError::bad_request(k.as_str(), "unknown field")),
            None => Ok(()),
        }
    }
}
