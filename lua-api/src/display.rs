//! Readable forms of Lua values for the REPL: tables are printed one level deep with
//! sorted keys, VM handles as `vm<name #id state, ...>`.

use mlua::{Table, Value};

use crate::vm::VmHandle;

const MAX_ITEMS: usize = 50;

/// Formats a value; nested tables are printed up to `depth` levels.
pub fn format_value(value: &Value, depth: usize) -> String {
    match value {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Table(t) => format_table(t, depth),
        Value::UserData(ud) => match ud.borrow::<VmHandle>() {
            Ok(vm) => vm.describe(),
            Err(_) => value.to_string().unwrap_or_else(|_| "userdata".into()),
        },
        other => other
            .to_string()
            .unwrap_or_else(|_| other.type_name().into()),
    }
}

fn format_table(t: &Table, depth: usize) -> String {
    if depth == 0 {
        return "{...}".into();
    }
    let mut array = Vec::new();
    let len = t.raw_len();
    for i in 1..=len.min(MAX_ITEMS) {
        array.push(format_value(
            &t.raw_get::<Value>(i).unwrap_or(Value::Nil),
            depth - 1,
        ));
    }
    let mut keyed: Vec<(String, String)> = Vec::new();
    for (k, v) in t.clone().pairs::<Value, Value>().flatten() {
        if let Value::Integer(i) = k {
            if i >= 1 && (i as usize) <= len {
                continue;
            }
        }
        let key = match &k {
            Value::String(s) => {
                let s = s.to_string_lossy();
                if is_identifier(&s) {
                    s
                } else {
                    format!("[{s:?}]")
                }
            }
            other => format!("[{}]", format_value(other, 0)),
        };
        keyed.push((key, format_value(&v, depth - 1)));
    }
    keyed.sort();
    let mut items = array;
    if len > MAX_ITEMS {
        items.push(format!("... ({} more)", len - MAX_ITEMS));
    }
    items.extend(
        keyed
            .into_iter()
            .take(MAX_ITEMS)
            .map(|(k, v)| format!("{k} = {v}")),
    );
    if items.is_empty() {
        "{}".into()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_tables_sorted() {
        let lua = mlua::Lua::new();
        let v: Value = lua
            .load(r#"return { 1, "two", b = true, a = { x = 1 }, ["not id"] = 3 }"#)
            .eval()
            .unwrap();
        assert_eq!(
            format_value(&v, 2),
            r#"{ 1, "two", ["not id"] = 3, a = { x = 1 }, b = true }"#
        );
        assert_eq!(
            format_value(&v, 1),
            r#"{ 1, "two", ["not id"] = 3, a = {...}, b = true }"#
        );
    }
}
