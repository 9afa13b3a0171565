//! Checks a document's shape against the JSON Schema of its type before the typed parse, so
//! that every unknown field, wrong type and bad enum value is reported at once with its path
//! (serde alone stops at the first). Understands the subset of JSON Schema schemars emits.

use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::errors::{SpecError, ValidationErrors};

/// Why [`parse_all`] gave up.
#[derive(Debug)]
enum ParseAll {
    /// Every problem found, shape and values.
    Invalid(ValidationErrors),
    /// The typed parse failed on something the shape check does not model.
    Shape(String),
}

/// Shape check, typed parse, then `validate`. When the shape is wrong, the offending fields
/// are dropped (falling back to their defaults) and the rest is still parsed and validated,
/// so one run reports as much as it can.
fn parse_all<T: DeserializeOwned>(
    schema: &Value,
    mut doc: Value,
    validate: impl Fn(&T) -> Result<(), ValidationErrors>,
) -> Result<T, ParseAll> {
    let mut errs = ValidationErrors::default();
    check(schema, schema, &doc, &mut String::new(), &mut errs);
    if errs.is_empty() {
        let typed: T = serde_json::from_value(doc).map_err(|e| ParseAll::Shape(e.to_string()))?;
        return match validate(&typed) {
            Ok(()) => Ok(typed),
            Err(e) => Err(ParseAll::Invalid(e)),
        };
    }
    let removed: Vec<String> = errs.0.iter().map(|e| droppable_field(&e.path)).collect();
    for path in &removed {
        remove(&mut doc, path);
    }
    if let Ok(typed) = serde_json::from_value::<T>(doc)
        && let Err(more) = validate(&typed)
    {
        for e in more.0 {
            if !removed.iter().any(|r| within(&e.path, r)) {
                errs.0.push(e);
            }
        }
    }
    Err(ParseAll::Invalid(errs))
}

/// Reads a document's text.
pub(crate) fn read(path: &std::path::Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// YAML text as a generic value; syntax errors are parse errors about `what`.
pub(crate) fn yaml_value(what: &str, text: &str) -> Result<Value, SpecError> {
    serde_saphyr::from_str(text).map_err(|e| SpecError::Parse {
        what: what.into(),
        message: e.to_string(),
    })
}

/// The `apiVersion` and `kind` every document carries.
pub(crate) fn check_header(api_version: &str, kind: &str, want: &str, errs: &mut ValidationErrors) {
    if api_version != crate::API_VERSION {
        errs.push(
            "apiVersion",
            format!("must be {:?}, found {api_version:?}", crate::API_VERSION),
        );
    }
    if kind != want {
        errs.push("kind", format!("must be {want:?}, found {kind:?}"));
    }
}

/// [`parse_all`] against `T`'s own JSON Schema, with errors as a [`SpecError`] about `what`.
pub(crate) fn parse_document<T: DeserializeOwned + schemars::JsonSchema>(
    what: &str,
    doc: Value,
    validate: impl Fn(&T) -> Result<(), ValidationErrors>,
) -> Result<T, SpecError> {
    let schema = schemars::schema_for!(T);
    parse_all(schema.as_value(), doc, validate).map_err(|e| match e {
        ParseAll::Invalid(errors) => SpecError::Invalid {
            what: what.into(),
            errors,
        },
        ParseAll::Shape(message) => SpecError::Parse {
            what: what.into(),
            message,
        },
    })
}

/// For each list [`merge`] appended to: its path and, per item of the merged list, the
/// item's index in the document merged over (`None` for the base's own items).
pub(crate) type ListOrigins = Vec<(String, Vec<Option<usize>>)>;

/// Merges `over` into `base`: objects field by field, lists appended (without repeating
/// equal items), anything else replaced. `path` is where `base` sits in the document;
/// `origins` records where appended list items came from, for [`renumber`].
pub(crate) fn merge(base: &mut Value, over: Value, path: &str, origins: &mut ListOrigins) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v, &join(path, &k), origins),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) => {
            let mut from: Vec<Option<usize>> = vec![None; b.len()];
            for (j, v) in o.into_iter().enumerate() {
                match b.iter().position(|x| *x == v) {
                    // The same item written again: errors in it are the document's.
                    Some(k) => from[k] = Some(j),
                    None => {
                        b.push(v);
                        from.push(Some(j));
                    }
                }
            }
            origins.push((path.to_string(), from));
        }
        (b, o) => *b = o,
    }
}

/// Rewrites error paths into merged lists (`spec.os.packages[17]`) to the index the item
/// has in the document that was merged (`spec.os.packages[0]`), so they point at what the
/// user wrote.
pub(crate) fn renumber(errors: &mut ValidationErrors, origins: &ListOrigins) {
    for e in &mut errors.0 {
        for (list, from) in origins {
            let Some(rest) = e
                .path
                .strip_prefix(list.as_str())
                .and_then(|r| r.strip_prefix('['))
            else {
                continue;
            };
            let Some((index, tail)) = rest.split_once(']') else {
                continue;
            };
            if let Some(Some(orig)) = index.parse::<usize>().ok().and_then(|i| from.get(i)) {
                e.path = format!("{list}[{orig}]{tail}");
            }
            break;
        }
    }
}

fn within(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// The object field to drop for an error at `path`. A bad list item is not dropped by
/// itself (that would shift the indices of later errors): its whole list is.
fn droppable_field(path: &str) -> String {
    let mut p = path;
    while p.ends_with(']') {
        match p.rfind('[') {
            Some(i) => p = &p[..i],
            None => break,
        }
    }
    p.to_string()
}

/// Removes the object field at a path like `spec.users[1].shell`.
fn remove(doc: &mut Value, path: &str) {
    let Some((parent, last)) = path.rsplit_once('.').map_or(Some(("", path)), Some) else {
        return;
    };
    let mut cur = doc;
    for seg in parent.split('.').filter(|s| !s.is_empty()) {
        let (key, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        match cur.get_mut(key) {
            Some(next) => cur = next,
            None => return,
        }
        for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            match idx.parse::<usize>().ok().and_then(|i| cur.get_mut(i)) {
                Some(next) => cur = next,
                None => return,
            }
        }
    }
    if let Some(obj) = cur.as_object_mut() {
        obj.remove(last);
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn at(path: &str) -> String {
    if path.is_empty() {
        "(document)".into()
    } else {
        path.into()
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => true,
    }
}

fn type_name(t: &str) -> &str {
    match t {
        "null" => "nothing",
        "boolean" => "true or false",
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "number" => "a number",
        "integer" => "a whole number",
        other => other,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// Allowed values when `schema` is an enumeration (`enum`, or `oneOf` of `const`s).
fn enumeration(root: &Value, schema: &Value) -> Option<Vec<Value>> {
    let schema = resolve(root, schema);
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        return Some(e.clone());
    }
    if let Some(c) = schema.get("const") {
        return Some(vec![c.clone()]);
    }
    let branches = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)?;
    let mut all = Vec::new();
    for b in branches {
        all.extend(enumeration(root, b)?);
    }
    Some(all)
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix('#')
            .and_then(|p| root.pointer(p))
            .map(|s| resolve(root, s))
            .unwrap_or(schema),
        None => schema,
    }
}

/// Checks `v` against `schema`; `path` is where `v` sits, one buffer grown and cut back on the
/// way down (a config may hold thousands of entries: no string per field).
fn check(root: &Value, schema: &Value, v: &Value, path: &mut String, errs: &mut ValidationErrors) {
    let schema = resolve(root, schema);
    if schema == &Value::Bool(false) {
        errs.push(at(path), "is not allowed here");
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(root, s, v, path, errs);
        }
    }
    if let Some(allowed) = enumeration(root, schema) {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
                .collect();
            errs.push(
                at(path),
                format!("{} is not one of: {}", short(v), list.join(", ")),
            );
        }
        return;
    }
    if let Some(branches) = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)
    {
        if let Some(tags) = tagged_variants(root, branches)
            && v.is_object()
        {
            let present: Vec<&String> = v.as_object().into_iter().flat_map(|m| m.keys()).collect();
            if present.len() != 1 || !tags.contains(&present[0].as_str()) {
                errs.push(
                    at(path),
                    format!("needs exactly one of the fields: {}", tags.join(", ")),
                );
                return;
            }
        }
        let mut best: Option<ValidationErrors> = None;
        for b in branches {
            let mut e = ValidationErrors::default();
            check(root, b, v, path, &mut e);
            if e.is_empty() {
                return;
            }
            // Report the branch whose type fits (an Option's value, not its null).
            let fits =
                declared_types(root, b).is_none_or(|ts| ts.iter().any(|t| type_matches(t, v)));
            if fits && best.as_ref().is_none_or(|b| e.0.len() < b.0.len()) {
                best = Some(e);
            }
        }
        match best {
            Some(e) => errs.0.extend(e.0),
            None => errs.push(at(path), format!("{} does not fit here", kind_of(v))),
        }
        return;
    }
    if let Some(types) = declared_types(root, schema)
        && !types.iter().any(|t| type_matches(t, v))
    {
        let want: Vec<&str> = types
            .iter()
            .filter(|t| **t != "null")
            .map(|t| type_name(t))
            .collect();
        // YAML reads 0x55cd…, 0644, yes and 1.10 as numbers or booleans.
        let hint = if types.contains(&"string") && (v.is_number() || v.is_boolean()) {
            "; put it in quotes"
        } else {
            ""
        };
        errs.push(
            at(path),
            format!(
                "expected {}, found {} ({}){hint}",
                want.join(" or "),
                kind_of(v),
                short(v)
            ),
        );
        return;
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errs.push(join(path, r), "is required");
                    }
                }
            }
            for (k, item) in map {
                let len = path.len();
                if len > 0 {
                    path.push('.');
                }
                path.push_str(k);
                match (
                    props.and_then(|ps| ps.get(k)),
                    schema.get("additionalProperties"),
                ) {
                    (Some(s), _) => check(root, s, item, path, errs),
                    (None, Some(Value::Bool(false))) => {
                        let known: Vec<&str> = props
                            .map(|ps| ps.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        errs.push(
                            path.clone(),
                            format!("unknown field (known here: {})", known.join(", ")),
                        );
                    }
                    (None, Some(s @ Value::Object(_))) => check(root, s, item, path, errs),
                    (None, _) => {}
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    write!(path, "[{i}]").expect("writing to a String");
                    check(root, s, item, path, errs);
                    path.truncate(len);
                }
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errs.push(at(path), format!("needs at least {min} item(s)"));
            }
        }
        Value::Number(n) => {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n.as_f64().is_some_and(|x| x < min)
            {
                errs.push(at(path), format!("{n} is below the minimum {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n.as_f64().is_some_and(|x| x > max)
            {
                errs.push(at(path), format!("{n} is above the maximum {max}"));
            }
        }
        Value::String(s) => {
            if schema.get("format").and_then(Value::as_str) == Some(crate::size::BYTE_SIZE_FORMAT)
                && let Err(e) = s.parse::<crate::size::ByteSize>()
            {
                errs.push(at(path), e.to_string());
            }
        }
        _ => {}
    }
}

/// The variant names when every branch is an object with one required field (how serde
/// writes an enum whose variants carry data, e.g. `{file: path}` or `{env: NAME}`).
fn tagged_variants<'a>(root: &'a Value, branches: &'a [Value]) -> Option<Vec<&'a str>> {
    branches
        .iter()
        .map(|b| {
            let b = resolve(root, b);
            match b
                .get("required")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                Some([only]) if b.get("type").and_then(Value::as_str) == Some("object") => {
                    only.as_str()
                }
                _ => None,
            }
        })
        .collect()
}

fn declared_types<'a>(root: &'a Value, schema: &'a Value) -> Option<Vec<&'a str>> {
    match resolve(root, schema).get("type")? {
        Value::String(t) => Some(vec![t.as_str()]),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

/// A PEM certificate and a PEM private key, by their armour: the TLS stacks that load them
/// say more, but only once the node runs.
pub(crate) fn check_pem_pair(at: &str, cert: &str, key: &str, errs: &mut ValidationErrors) {
    if !cert.trim_start().starts_with("-----BEGIN CERTIFICATE-----") {
        errs.push(format!("{at}.cert"), "not a PEM certificate");
    }
    if !(key.trim_start().starts_with("-----BEGIN ") && key.contains("PRIVATE KEY-----")) {
        errs.push(format!("{at}.key"), "not a PEM private key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_appends_lists_and_replaces_values() {
        let mut base = json!({"a": {"list": [1, 2], "x": 1, "keep": true}});
        let mut origins = ListOrigins::new();
        let over = json!({"a": {"list": [2, 3], "x": 5}, "b": null});
        merge(&mut base, over, "", &mut origins);
        assert_eq!(
            base,
            json!({"a": {"list": [1, 2, 3], "x": 5, "keep": true}, "b": null})
        );
        assert_eq!(
            origins,
            [("a.list".to_string(), vec![None, Some(0), Some(1)])]
        );
        let mut errs = ValidationErrors::default();
        errs.push("a.list[2]", "bad");
        errs.push("a.list[0]", "from the base");
        errs.push("a.listing[2]", "another list");
        renumber(&mut errs, &origins);
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.list[1]", "a.list[0]", "a.listing[2]"]);
    }

    #[test]
    fn a_bad_list_item_drops_its_list_and_a_bad_field_only_itself() {
        assert_eq!(droppable_field("spec.features[1]"), "spec.features");
        assert_eq!(
            droppable_field("spec.users[1].shell"),
            "spec.users[1].shell"
        );
        assert_eq!(
            droppable_field("spec.users[0].groups[2]"),
            "spec.users[0].groups"
        );
        let mut doc = json!({"spec": {"users": [{"name": "a"}, {"name": "b", "shell": "x"}]}});
        remove(&mut doc, "spec.users[1].shell");
        assert_eq!(
            doc,
            json!({"spec": {"users": [{"name": "a"}, {"name": "b"}]}})
        );
        assert!(within("spec.users[1].name", "spec.users"));
        assert!(!within("spec.usersx", "spec.users"));
    }

    #[test]
    fn shape_errors_name_the_path_and_what_was_expected() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "size": {"type": ["string", "integer"], "format": crate::size::BYTE_SIZE_FORMAT},
                "mode": {"oneOf": [{"const": "a"}, {"const": "b"}]},
                "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}}
            }
        });
        let doc =
            json!({"size": "8 gigs", "mode": "c", "ports": [80, 0, "x"], "extra": 1, "name2": 0});
        let mut errs = ValidationErrors::default();
        check(&schema, &schema, &doc, &mut String::new(), &mut errs);
        let got: Vec<String> = errs
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.reason))
            .collect();
        assert_eq!(
            got,
            [
                "name: is required",
                "extra: unknown field (known here: mode, name, ports, size)",
                "mode: \"c\" is not one of: a, b",
                "name2: unknown field (known here: mode, name, ports, size)",
                "ports[1]: 0 is below the minimum 1",
                "ports[2]: expected a whole number, found a string (\"x\")",
                "size: \"8 gigs\" is not a size like \"512MiB\", \"8GiB\" or a number of bytes",
            ]
        );
    }
}
