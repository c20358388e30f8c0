//! `hv.disk`: disk images as Lua objects.
//!
//! ```lua
//! local base = hv.disk.create{ path = "base.img", size = "256M" }      -- sparse raw file
//! local d = hv.disk.open("data.img", { readonly = true })
//! local o = hv.disk.overlay{ base = "base.img", path = "vm1.qcow2" }   -- copy-on-write clone
//! print(o.path, o.size, o.format, o.readonly)
//! local s = o:stats()  -- { reads, writes, flushes, discards, bytes_read, bytes_written, errors }
//! ```
//!
//! A disk is attached to a VM with `hv.vm{ disks = { d } }`; its file is opened and
//! locked when the VM starts (exclusively when writable) and released when it stops.

use std::path::PathBuf;
use std::sync::Arc;

use luvisor_runtime::storage::{Disk, SECTOR_SIZE};
use mlua::{Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
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
fn path_value(function: &str, what: &str, value: Value) -> mlua::Result<PathBuf> {
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

fn apply_serial(disk: Disk, opts: &Options) -> mlua::Result<Disk> {
    let mut disk = disk;
    if let Some(serial) = opts.string("serial")? {
        if serial.len() > 20 {
            return Err(opts.error("option 'serial' must be at most 20 bytes"));
        }
        disk.set_serial(&serial);
    }
    Ok(disk)
}

pub fn register(lua: &Lua, hv: &Table) -> mlua::Result<()> {
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
            let created = match opts.string("format")?.as_deref() {
                None | Some("raw") => Disk::create_raw(&path, size),
                Some("qcow2") => Disk::create_qcow2(&path, size),
                Some(other) => {
                    return Err(opts.error(format!(
                        "option 'format' must be \"raw\" or \"qcow2\", got {other:?}"
                    )))
                }
            };
            let disk = created.map_err(|e| storage_err(F, e))?;
            Ok(DiskHandle(Arc::new(apply_serial(disk, &opts)?)))
        })?,
    )?;
    disk.set(
        "open",
        lua.create_function(|lua, (path, opts): (Value, Value)| {
            const F: &str = "hv.disk.open";
            let path = path_value(F, "the path", path)?;
            let opts = Options::from_value(lua, F, opts, &["readonly", "serial"])?;
            let readonly = opts.boolean("readonly")?.unwrap_or(false);
            let disk = Disk::open(&path, readonly).map_err(|e| storage_err(F, e))?;
            Ok(DiskHandle(Arc::new(apply_serial(disk, &opts)?)))
        })?,
    )?;
    disk.set(
        "overlay",
        lua.create_function(|lua, opts: Value| {
            const F: &str = "hv.disk.overlay";
            let opts = Options::from_value(lua, F, opts, &["base", "path", "serial"])?;
            let base = path_value(F, "option 'base'", opts.raw("base")?)?;
            let path = path_value(F, "option 'path'", opts.raw("path")?)?;
            let disk = Disk::create_overlay(&base, &path).map_err(|e| storage_err(F, e))?;
            Ok(DiskHandle(Arc::new(apply_serial(disk, &opts)?)))
        })?,
    )?;
    hv.set("disk", disk)
}

/// Reads the `disks` option of `hv.vm`: a list of disks.
pub fn disks_option(opts: &Options) -> mlua::Result<Vec<Arc<Disk>>> {
    match opts.raw("disks")? {
        Value::Nil => Ok(Vec::new()),
        Value::Table(list) => {
            let mut disks = Vec::new();
            for (i, value) in list.sequence_values::<Value>().enumerate() {
                match value? {
                    Value::UserData(ud) => match ud.borrow::<DiskHandle>() {
                        Ok(d) => disks.push(d.0.clone()),
                        Err(_) => return Err(opts.error(format!("option 'disks' item {} is not a disk", i + 1))),
                    },
                    other => {
                        return Err(opts.error(format!(
                            "option 'disks' item {} must be a disk from hv.disk.open/create/overlay, got {}",
                            i + 1,
                            describe(&other)
                        )))
                    }
                }
            }
            Ok(disks)
        }
        other => Err(opts.error(format!(
            "option 'disks' must be a list of disks, got {}",
            describe(&other)
        ))),
    }
}
