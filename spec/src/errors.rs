//! Errors of parsing and validating documents.

use std::fmt;

/// One problem in a document: where it is (a dotted field path such as
/// `spec.nodes[2].bmc.port`) and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

/// Every problem found in one document. Validation never stops at the first one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was found, else all the errors.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {}: {}", e.path, e.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// An error with each of its causes, `outer: inner: …`: HTTP and TLS clients put the reason
/// that helps (a refused certificate, a reset connection) in the causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Why a document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The text is not a well-formed document of the expected shape.
    #[error("parsing {what}: {message}")]
    Parse { what: String, message: String },
    /// The document parsed but its values are not acceptable.
    #[error("invalid {what}: {errors}")]
    Invalid {
        what: String,
        errors: ValidationErrors,
    },
}
