//! `hv.disk`: disk images as Lua objects.
//!
//! ```lua
//! local base = hv.disk.create{ path = "base.img", size = "256M" }      -- sparse raw file
//! local d = hv.disk.open("data.img", { readonly = true, format = "raw" })
//! local o = hv.disk.overlay{ base = "base.img", path = "vm1.qcow2" }   -- copy-on-write clone
//! print(o.path, o.size, o.format, o.readonly)
//! local s = o:stats()  -- { reads, writes, ..., format_probed, backing = { ... } }
//! ```
//!
//! A disk is attached to a VM with `hv.vm{ disks = { d, { path = "x.img", format = "raw" } } }`;
//! its file is opened and locked when the VM starts (exclusively when writable) and
//! released when it stops.

use std::path::PathBuf;
use std::sync::Arc;

use luvisor_runtime::storage::{Disk, DiskFormat, OpenOptions, SECTOR_SIZE};
use mlua::{Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{describe, Options};

/// The Lua object for a disk.
#[derive(Clone)]
pub struct DiskHandle(pub Arc<Disk>);

impl UserData for DiskHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("path", |_, this| Ok(this.0.path().display().to_string()));
        fields.add_field_method_get("size", |_, this| Ok(this.0.size()));
        fields.add_field_method_get("format", |_, this| Ok(this.0.format().as_str()));
        fields.add_field_method_get("readonly", |_, this| Ok(this.0.readonly()));
        fields.add_field_method_get("serial", |_, this| Ok(this.0.serial().to_string()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("stats", |lua, this, ()| {
            let s = this.0.stats().snapshot();
            let t = lua.create_table()?;
            t.set("reads", s.reads)?;
            t.set("writes", s.writes)?;
            t.set("flushes", s.flushes)?;
            t.set("discards", s.discards)?;
            t.set("bytes_read", s.bytes_read)?;
            t.set("bytes_written", s.bytes_written)?;
            t.set("errors", s.errors)?;
            t.set("format", this.0.format().as_str())?;
            t.set("format_probed", !this.0.format_given())?;
            let chain = lua.create_table()?;
            for image in this.0.backing_chain() {
                let b = lua.create_table()?;
                b.set("path", image.path.display().to_string())?;
                b.set("format", image.format.as_str())?;
                b.set("format_recorded", image.format_recorded)?;
                if !image.format_recorded {
                    b.set(
                        "note",
                        "the overlay records no backing format, so this image is read as raw",
                    )?;
                }
                chain.push(b)?;
            }
            t.set("backing", chain)?;
            Ok(t)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!(
                "disk<{} {} {}{}>",
                this.0.path().display(),
                this.0.format().as_str(),
                luvisor_runtime::size::format_size(this.0.size()),
                if this.0.readonly() { " ro" } else { "" }
            ))
        });
    }
}

fn storage_err(function: &str, e: impl std::error::Error) -> mlua::Error {
    mlua::Error::runtime(format!("{function}: {}", error_chain(&e)))
}

/// A path option or argument: a string, or a disk (its path).
pub(crate) fn path_value(function: &str, what: &str, value: Value) -> mlua::Result<PathBuf> {
    match value {
        Value::String(s) => Ok(PathBuf::from(s.to_str()?.to_string())),
        Value::UserData(ud) => match ud.borrow::<DiskHandle>() {
            Ok(d) => Ok(d.0.path().to_path_buf()),
            Err(_) => Err(mlua::Error::runtime(format!(
                "{function}: {what} must be a path string or a disk"
            ))),
        },
        Value::Nil => Err(mlua::Error::runtime(format!(
            "{function}: {what} is required (a path string)"
        ))),
        other => Err(mlua::Error::runtime(format!(
            "{function}: {what} must be a path string or a disk, got {}",
            describe(&other)
        ))),
    }
}

/// Reads the optional `serial` option: at most 20 bytes, no NUL (the guest reads it as a
/// NUL-padded string, so a NUL would cut it short).
pub(crate) fn serial_option(opts: &Options) -> mlua::Result<Option<String>> {
    let Some(serial) = opts.string("serial")? else {
        return Ok(None);
    };
    if serial.len() > 20 {
        return Err(opts.error(format!(
            "option 'serial' must be at most 20 bytes, got {} bytes",
            serial.len()
        )));
    }
    if serial.contains('\0') {
        return Err(opts.error("option 'serial' must not contain NUL bytes"));
    }
    Ok(Some(serial))
}

fn apply_serial(disk: Disk, serial: Option<String>) -> Disk {
    let mut disk = disk;
    if let Some(serial) = serial {
        disk.set_serial(&serial);
    }
    disk
}

/// Reads the optional `format` option ("raw" or "qcow2"); `None` means probe.
pub(crate) fn format_option(opts: &Options) -> mlua::Result<Option<DiskFormat>> {
    match opts.string("format")? {
        None => Ok(None),
        Some(name) => DiskFormat::parse(&name).map(Some).ok_or_else(|| {
            opts.error(format!(
                "option 'format' must be \"raw\" or \"qcow2\", got {name:?}"
            ))
        }),
    }
}

/// Opens a disk from an options table with `path`, `readonly`, `format` and `serial`:
/// what `hv.disk.open` and a disk spec in `hv.vm{ disks = ... }` share.
fn open_disk(function: &str, path: PathBuf, opts: &Options) -> mlua::Result<DiskHandle> {
    let serial = serial_option(opts)?;
    let options = OpenOptions {
        readonly: opts.boolean("readonly")?.unwrap_or(false),
        format: format_option(opts)?,
    };
    let disk = Disk::open_with(&path, options).map_err(|e| storage_err(function, e))?;
    Ok(DiskHandle(Arc::new(apply_serial(disk, serial))))
}

/// Registers `hv.disk`.
pub const NAMESPACE: Namespace = Namespace {
    name: "disk",
    register,
};

fn register(lua: &Lua, hv: &Table, _: &Context) -> mlua::Result<()> {
    let disk = lua.create_table()?;
    disk.set(
        "create",
        lua.create_function(|lua, opts: Value| {
            const F: &str = "hv.disk.create";
            let opts = Options::from_value(lua, F, opts, &["path", "size", "format", "serial"])?;
            let path = path_value(F, "option 'path'", opts.raw("path")?)?;
            let size = opts
                .size("size")?
                .ok_or_else(|| opts.error("option 'size' is required, e.g. size = \"256M\""))?;
            if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
                return Err(opts.error(format!(
                    "option 'size' must be a non-zero multiple of 512 bytes, got {size}"
                )));
            }
            let serial = serial_option(&opts)?;
            let disk =
                Disk::create(&path, size, format_option(&opts)?).map_err(|e| storage_err(F, e))?;
            Ok(DiskHandle(Arc::new(apply_serial(disk, serial))))
        })?,
    )?;
    disk.set(
        "open",
        lua.create_function(|lua, (path, opts): (Value, Value)| {
            const F: &str = "hv.disk.open";
            let path = path_value(F, "the path", path)?;
            let opts = Options::from_value(lua, F, opts, &["readonly", "serial", "format"])?;
            open_disk(F, path, &opts)
        })?,
    )?;
    disk.set(
        "overlay",
        lua.create_function(|lua, opts: Value| {
            const F: &str = "hv.disk.overlay";
            let opts = Options::from_value(lua, F, opts, &["base", "path", "serial", "format"])?;
            let base = path_value(F, "option 'base'", opts.raw("base")?)?;
            let path = path_value(F, "option 'path'", opts.raw("path")?)?;
            let serial = serial_option(&opts)?;
            // `format` is the base's: the overlay itself is always qcow2, and records it.
            let disk = Disk::create_overlay_with(&base, format_option(&opts)?, &path)
                .map_err(|e| storage_err(F, e))?;
            // Under `luvisor test`, the overlay goes when the test that made it ends.
            crate::cleanup::remove_file_on_close(lua, disk.path());
            Ok(DiskHandle(Arc::new(apply_serial(disk, serial))))
        })?,
    )?;
    hv.set("disk", disk)
}

/// Keys of a disk spec table in `hv.vm{ disks = { ... } }`.
const DISK_SPEC_OPTIONS: &[&str] = &["path", "readonly", "format", "serial"];

/// Reads the `disks` option of `hv.vm`: a list whose items are disks (from
/// `hv.disk.open/create/overlay`), or specs `{ path = ..., format = ..., readonly = ...,
/// serial = ... }` opened here as `hv.disk.open` would.
pub fn disks_option(opts: &Options) -> mlua::Result<Vec<Arc<Disk>>> {
    let list = match opts.raw("disks")? {
        Value::Nil => return Ok(Vec::new()),
        Value::Table(list) => list,
        other => {
            return Err(opts.error(format!(
                "option 'disks' must be a list of disks, got {}",
                describe(&other)
            )))
        }
    };
    let len = list.raw_len();
    for pair in list.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let in_sequence = matches!(key, Value::Integer(i) if i >= 1 && (i as usize) <= len);
        if !in_sequence {
            return Err(opts.error(format!(
                "option 'disks' must be a list (disks = {{ d1, d2 }}), but it has the key {}",
                match &key {
                    Value::String(s) => format!("'{}'", s.to_string_lossy()),
                    other => describe(other),
                }
            )));
        }
    }
    let mut disks = Vec::new();
    for item in 1..=len {
        // raw_get rather than sequence_values, which would stop at a hole ({ d, nil, d }).
        match list.raw_get::<Value>(item)? {
            Value::UserData(ud) => match ud.borrow::<DiskHandle>() {
                Ok(d) => disks.push(d.0.clone()),
                Err(_) => {
                    return Err(opts.error(format!("option 'disks' item {item} is not a disk")))
                }
            },
            Value::Table(spec) => {
                let function = format!("hv.vm: disk spec {item}");
                let spec = Options::new(&function, spec, DISK_SPEC_OPTIONS)?;
                let path = path_value(&function, "option 'path'", spec.raw("path")?)?;
                disks.push(open_disk(&function, path, &spec)?.0);
            }
            Value::Nil => return Err(opts.error(format!("option 'disks' item {item} is nil"))),
            other => {
                return Err(opts.error(format!(
                    "option 'disks' item {item} must be a disk from hv.disk.open/create/overlay \
                     or a spec table {{ path = ..., format = ..., readonly = ... }}, got {}",
                    describe(&other)
                )))
            }
        }
    }
    Ok(disks)
}
