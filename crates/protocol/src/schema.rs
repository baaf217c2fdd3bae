//! The schema registry: which `"<name>/<version>"` schemas exist and what their properties are.
//!
//! A registry starts with the built-in schemas ([`SchemaRegistry::builtin`]) and takes user
//! schemas (typically loaded by the relay from a TOML file). A schema is immutable once
//! registered: changing it means registering a new version, so events already sent under
//! the old version keep validating.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type of one property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropType {
    /// A JSON string.
    String,
    /// Any JSON number.
    Number,
    /// A JSON number without a fractional part.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
    /// Anything, including `null`.
    Any,
}

impl PropType {
    /// Whether `value` has this type. `null` only matches [`PropType::Any`].
    pub fn matches(self, value: &Value) -> bool {
        match self {
            PropType::String => value.is_string(),
            PropType::Number => value.is_number(),
            PropType::Integer => value.is_i64() || value.is_u64(),
            PropType::Boolean => value.is_boolean(),
            PropType::Object => value.is_object(),
            PropType::Array => value.is_array(),
            PropType::Any => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PropType::String => "string",
            PropType::Number => "number",
            PropType::Integer => "integer",
            PropType::Boolean => "boolean",
            PropType::Object => "object",
            PropType::Array => "array",
            PropType::Any => "any",
        }
    }
}

/// One declared property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropSpec {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: PropType,
    /// Whether every event must carry it.
    #[serde(default)]
    pub required: bool,
}

/// One schema version as declared (in a file or built in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaDef {
    /// The schema name; events using it must have the same `name` unless `any_name` is set.
    pub name: String,
    /// The version, starting at 1.
    pub version: u32,
    /// Declared properties.
    #[serde(default)]
    pub props: BTreeMap<String, PropSpec>,
    /// Whether properties that are not declared are allowed.
    #[serde(default = "default_true")]
    pub additional_props: bool,
    /// Whether events of any name may use this schema (the generic `event/1`).
    #[serde(default)]
    pub any_name: bool,
}

fn default_true() -> bool {
    true
}

/// Why a schema could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Name empty, with a `/`, or version 0.
    #[error("schema {0:?}: name must be non-empty without '/', version at least 1")]
    Invalid(String),
    /// The same name/version registered twice with different contents.
    #[error(
        "schema {0} is already registered with a different definition; register a new version instead"
    )]
    Conflict(String),
}

/// Why props did not match a schema; the detail names the property.
pub(crate) enum PropsMismatch {
    Missing(String),
    WrongType(String),
    Unknown(String),
}

/// Known schemas, by `"<name>/<version>"`.
#[derive(Debug, Clone, Default)]
pub struct SchemaRegistry {
    schemas: HashMap<String, SchemaDef>,
}

impl SchemaRegistry {
    /// A registry with the built-in schemas:
    /// - `event/1`: any event name, any properties (what `track(name, props)` sends by default);
    /// - `page_view/1`: page views, any properties;
    /// - `identify/1`: identify calls, optional `traits` object.
    pub fn builtin() -> Self {
        let mut reg = SchemaRegistry::default();
        let defs = [
            SchemaDef {
                name: "event".into(),
                version: 1,
                props: BTreeMap::new(),
                additional_props: true,
                any_name: true,
            },
            SchemaDef {
                name: "page_view".into(),
                version: 1,
                props: BTreeMap::new(),
                additional_props: true,
                any_name: false,
            },
            SchemaDef {
                name: "identify".into(),
                version: 1,
                props: BTreeMap::from([(
                    "traits".to_string(),
                    PropSpec {
                        ty: PropType::Object,
                        required: false,
                    },
                )]),
                additional_props: false,
                any_name: false,
            },
        ];
        for def in defs {
            reg.register(def).expect("built-in schemas are valid");
        }
        reg
    }

    /// Adds a schema. Registering an identical definition twice is a no-op.
    pub fn register(&mut self, def: SchemaDef) -> Result<(), SchemaError> {
        let key = format!("{}/{}", def.name, def.version);
        if def.name.is_empty() || def.name.contains('/') || def.version == 0 {
            return Err(SchemaError::Invalid(key));
        }
        match self.schemas.get(&key) {
            Some(existing) if *existing == def => Ok(()),
            Some(_) => Err(SchemaError::Conflict(key)),
            None => {
                self.schemas.insert(key, def);
                Ok(())
            }
        }
    }

    /// Looks a schema up by its `"<name>/<version>"` key.
    pub fn get(&self, key: &str) -> Option<&SchemaDef> {
        self.schemas.get(key)
    }

    /// The registered keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.schemas.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }
}

impl SchemaDef {
    pub(crate) fn check_props(&self, props: &Map<String, Value>) -> Result<(), PropsMismatch> {
        for (key, spec) in &self.props {
            match props.get(key) {
                None if spec.required => return Err(PropsMismatch::Missing(key.clone())),
                None => {}
                Some(value) if !spec.ty.matches(value) => {
                    return Err(PropsMismatch::WrongType(format!(
                        "props.{key}: expected {}",
                        spec.ty.name()
                    )));
                }
                Some(_) => {}
            }
        }
        if !self.additional_props
            && let Some(key) = props.keys().find(|k| !self.props.contains_key(*k))
        {
            return Err(PropsMismatch::Unknown(key.clone()));
        }
        Ok(())
    }
}
