//! Strict option tables: `hv.vm{ name = "x", memory = "128M" }`.
//!
//! Every constructor names its valid keys; an unknown key, or a value of the wrong kind,
//! raises a Lua error that names the function, the option and what is accepted.

use luvisor_runtime::size::parse_size;
use mlua::{Table, Value};

/// An options table being read by `function` (e.g. `"hv.vm"`).
pub struct Options {
    function: String,
    table: Table,
}

impl Options {
    /// Checks that every key of `table` is one of `valid`.
    pub fn new(function: &str, table: Table, valid: &[&str]) -> mlua::Result<Options> {
        for pair in table.pairs::<Value, Value>() {
            let (key, _) = pair?;
            let name = match &key {
                Value::String(s) => s.to_string_lossy(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "{function}: option keys must be strings, got {}; valid options are: {}",
                        a_type_name(other),
                        valid.join(", ")
                    )))
                }
            };
            if !valid.contains(&name.as_str()) {
                return Err(mlua::Error::runtime(format!(
                    "{function}: unknown option '{name}'; valid options are: {}",
                    valid.join(", ")
                )));
            }
        }
        Ok(Options {
            function: function.to_string(),
            table,
        })
    }

    /// Accepts a table argument, or reports what the function expects.
    /// A missing table (`nil`) reads as an empty one.
    pub fn from_value(
        lua: &mlua::Lua,
        function: &str,
        value: Value,
        valid: &[&str],
    ) -> mlua::Result<Options> {
        match value {
            Value::Table(t) => Options::new(function, t, valid),
            Value::Nil => Options::new(function, lua.create_table()?, valid),
            other => Err(mlua::Error::runtime(format!(
                "{function}: expected an options table {{ {} = ... }}, got {}",
                valid.join(" = ..., "),
                a_type_name(&other)
            ))),
        }
    }

    pub fn error(&self, message: impl std::fmt::Display) -> mlua::Error {
        mlua::Error::runtime(format!("{}: {}", self.function, message))
    }

    pub fn raw(&self, key: &str) -> mlua::Result<Value> {
        self.table.raw_get(key)
    }

    pub fn string(&self, key: &str) -> mlua::Result<Option<String>> {
        match self.raw(key)? {
            Value::Nil => Ok(None),
            Value::String(s) => Ok(Some(utf8_text(
                &self.function,
                &format!("option '{key}'"),
                &s,
            )?)),
            other => Err(self.error(format!(
                "option '{key}' must be a string, got {}",
                a_type_name(&other)
            ))),
        }
    }

    pub fn boolean(&self, key: &str) -> mlua::Result<Option<bool>> {
        match self.raw(key)? {
            Value::Nil => Ok(None),
            Value::Boolean(b) => Ok(Some(b)),
            other => Err(self.error(format!(
                "option '{key}' must be a boolean, got {}",
                a_type_name(&other)
            ))),
        }
    }

    /// An integer in `range`; the error states the range.
    pub fn integer(&self, key: &str, min: i64, max: i64) -> mlua::Result<Option<i64>> {
        let value = self.raw(key)?;
        let n = match &value {
            Value::Nil => return Ok(None),
            Value::Integer(i) => Some(*i),
            Value::Number(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i64),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.error(format!(
                "option '{key}' must be an integer from {min} to {max}, got {}",
                describe(&value)
            ))),
        }
    }

    /// A size: bytes as an integer, or a string such as "512K", "128M", "2G".
    pub fn size(&self, key: &str) -> mlua::Result<Option<u64>> {
        let value = self.raw(key)?;
        size_value(&value).map_err(|got| {
            self.error(format!(
                "option '{key}' must be a size: bytes as an integer, or a string like \"512K\", \"128M\", \"2G\"; got {got}"
            ))
        })
    }

    /// A duration in seconds (a non-negative number; `math.huge` waits forever).
    pub fn seconds(&self, key: &str) -> mlua::Result<Option<std::time::Duration>> {
        let value = self.raw(key)?;
        seconds_value(&value).map_err(|got| {
            self.error(format!(
                "option '{key}' must be a number of seconds >= 0, got {got}"
            ))
        })
    }
}

/// Reads an optional size; `Err` carries a description of the bad value.
pub fn size_value(value: &Value) -> Result<Option<u64>, String> {
    match value {
        Value::Nil => Ok(None),
        Value::Integer(i) if *i >= 0 => Ok(Some(*i as u64)),
        Value::Number(f) if *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19 => Ok(Some(*f as u64)),
        Value::String(s) => {
            let text = s.to_string_lossy();
            parse_size(&text).map(Some).map_err(|_| format!("{text:?}"))
        }
        other => Err(describe(other)),
    }
}

/// Reads an optional number of seconds.
pub fn seconds_value(value: &Value) -> Result<Option<std::time::Duration>, String> {
    let secs = match value {
        Value::Nil => return Ok(None),
        Value::Integer(i) => *i as f64,
        Value::Number(f) => *f,
        other => return Err(describe(other)),
    };
    if secs.is_nan() || secs < 0.0 {
        return Err(describe(value));
    }
    Ok(Some(
        std::time::Duration::try_from_secs_f64(secs).unwrap_or(std::time::Duration::MAX),
    ))
}

/// A short description of a value for error messages: `"12Q"`, `-3`, `a table`.
pub fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Nil => "nil".into(),
        other => a_type_name(other),
    }
}

/// A Lua string as Rust text. A string that is not UTF-8 gets an error that names the
/// call and the argument (`vm.kvp.host:set: the value must be UTF-8 text (invalid utf-8
/// sequence of 1 bytes from index 0)`), rather than mlua's conversion error.
pub fn utf8_text(function: &str, what: &str, s: &mlua::LuaString) -> mlua::Result<String> {
    let bytes = s.as_bytes();
    std::str::from_utf8(&bytes)
        .map(str::to_string)
        .map_err(|e| mlua::Error::runtime(format!("{function}: {what} must be UTF-8 text ({e})")))
}

/// A value's Lua type with its article, for messages: "a table", "an integer".
pub fn a_type_name(value: &Value) -> String {
    let name = value.type_name();
    let article = if name.starts_with(['a', 'e', 'i', 'o']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_take_the_right_article() {
        assert_eq!(a_type_name(&Value::Integer(1)), "an integer");
        assert_eq!(a_type_name(&Value::Number(1.5)), "a number");
        assert_eq!(a_type_name(&Value::Boolean(true)), "a boolean");
        let lua = mlua::Lua::new();
        let table = Value::Table(lua.create_table().unwrap());
        assert_eq!(a_type_name(&table), "a table");
        assert_eq!(describe(&table), "a table");
    }
}
