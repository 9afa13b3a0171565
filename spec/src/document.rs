//! Any kiln document, recognised by its `kind`, for commands that take whichever they are
//! given (`kiln spec validate`).

use schemars::JsonSchema;

use crate::errors::{SpecError, ValidationErrors};
use crate::{Appliance, Inventory, NodeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Appliance,
    Inventory,
    NodeConfig,
}

impl DocumentKind {
    pub const ALL: [DocumentKind; 3] = [
        DocumentKind::Appliance,
        DocumentKind::Inventory,
        DocumentKind::NodeConfig,
    ];

    /// The `kind:` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Appliance => "Appliance",
            DocumentKind::Inventory => "Inventory",
            DocumentKind::NodeConfig => "NodeConfig",
        }
    }

    /// The JSON Schema of the document.
    pub fn schema(self) -> serde_json::Value {
        fn of<T: JsonSchema>() -> serde_json::Value {
            schemars::schema_for!(T).to_value()
        }
        match self {
            DocumentKind::Appliance => of::<Appliance>(),
            DocumentKind::Inventory => of::<Inventory>(),
            DocumentKind::NodeConfig => of::<NodeConfig>(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    Appliance(Box<Appliance>),
    Inventory(Inventory),
    NodeConfig(Box<NodeConfig>),
}

impl Document {
    pub fn kind(&self) -> DocumentKind {
        match self {
            Document::Appliance(_) => DocumentKind::Appliance,
            Document::Inventory(_) => DocumentKind::Inventory,
            Document::NodeConfig(_) => DocumentKind::NodeConfig,
        }
    }

    /// Parses and validates a document of any kind, by its `kind` field.
    pub fn from_yaml(text: &str) -> Result<Document, SpecError> {
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| SpecError::Parse {
                what: "document".into(),
                message: e.to_string(),
            })?;
        let known: Vec<&str> = DocumentKind::ALL.iter().map(|k| k.as_str()).collect();
        let kind = value.get("kind").and_then(|k| k.as_str());
        match DocumentKind::ALL
            .into_iter()
            .find(|k| Some(k.as_str()) == kind)
        {
            Some(DocumentKind::Appliance) => {
                Appliance::from_value(value).map(|a| Document::Appliance(Box::new(a)))
            }
            Some(DocumentKind::Inventory) => Inventory::from_yaml(text).map(Document::Inventory),
            Some(DocumentKind::NodeConfig) => {
                // Through the shape check, so every error is listed, not only serde's first.
                crate::check::parse_document("node config", value, NodeConfig::validate)
                    .map(|c| Document::NodeConfig(Box::new(c)))
            }
            None => {
                let mut errors = ValidationErrors::default();
                let found = match kind {
                    Some(k) => format!("found {k:?}"),
                    None => "missing".to_string(),
                };
                errors.push(
                    "kind",
                    format!("must be one of {}; {found}", known.join(", ")),
                );
                Err(SpecError::Invalid {
                    what: "document".into(),
                    errors,
                })
            }
        }
    }
}
