//! A seccomp profile compiled once to the BPF program the kernel loads, for crun.
//!
//! crun compiles a container's `linux.seccomp` with libseccomp on every start: for Docker's
//! default profile (about 400 rules on three architectures) that is some 15 ms of a 22 ms
//! `crun run` on this machine. crun also takes the compiled program itself, base64 in the
//! annotation [`ANNOTATION`], and then loads it without compiling. The agent compiles its one
//! profile once, the way crun would, and hands the result to every container.
//!
//! The compile is crun's own (`libcrun_generate_seccomp`, crun 1.8): the same libseccomp calls in
//! the same order, so the program is byte for byte the one crun would have made (a test compares
//! the two). libseccomp is loaded at run time (`dlopen("libseccomp.so.2")`): crun links it, so
//! it is there wherever crun is, and the agent needs no build dependency for it. Without it the
//! agent simply does not precompile and crun compiles as before.
//!
//! The OCI section stays in the spec beside the annotation (crun ignores it then; runc, which
//! knows no such annotation, is never given one).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::{Read as _, Seek as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use base64::Engine as _;
use oci_spec::runtime::LinuxSeccomp;
use serde_json::Value;

/// crun's annotation for a precompiled filter (base64 of the raw `sock_filter` array).
pub const ANNOTATION: &str = "run.oci.seccomp_bpf_data";

/// Why a profile could not be compiled here (the agent then lets the runtime compile it).
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("seccomp: libseccomp is not loadable: {0}")]
    NoLibrary(String),
    #[error("seccomp: libseccomp has no {0}")]
    NoSymbol(&'static str),
    #[error("seccomp: profile: {0}")]
    Profile(String),
    #[error("seccomp: {call} failed: errno {errno}")]
    Call { call: &'static str, errno: i32 },
    #[error("seccomp: {op}: {err}")]
    Io {
        op: &'static str,
        #[source]
        err: std::io::Error,
    },
}

/// A profile and its compiled program, as crun's annotation wants it.
#[derive(Debug, Clone)]
pub struct Precompiled {
    /// The profile it was compiled from: only a spec with this very profile gets the program.
    pub profile: LinuxSeccomp,
    /// The program, base64.
    pub base64: String,
}

impl Precompiled {
    /// Compiles `profile` with the host's libseccomp.
    pub fn compile(profile: &LinuxSeccomp) -> Result<Precompiled, BpfError> {
        let program = compile(profile)?;
        Ok(Precompiled {
            profile: profile.clone(),
            base64: base64::engine::general_purpose::STANDARD.encode(program),
        })
    }
}

/// libseccomp's `struct scmp_arg_cmp`.
#[repr(C)]
struct ArgCmp {
    arg: c_uint,
    op: c_int,
    datum_a: u64,
    datum_b: u64,
}

type Ctx = *mut c_void;

/// The libseccomp calls crun makes, looked up once.
struct Lib {
    handle: *mut c_void,
    init: unsafe extern "C" fn(u32) -> Ctx,
    release: unsafe extern "C" fn(Ctx),
    arch_resolve_name: unsafe extern "C" fn(*const c_char) -> u32,
    arch_add: unsafe extern "C" fn(Ctx, u32) -> c_int,
    syscall_resolve_name: unsafe extern "C" fn(*const c_char) -> c_int,
    rule_add_array: unsafe extern "C" fn(Ctx, u32, c_int, c_uint, *const ArgCmp) -> c_int,
    export_bpf: unsafe extern "C" fn(Ctx, c_int) -> c_int,
}

impl Lib {
    fn open() -> Result<Lib, BpfError> {
        // SAFETY: dlopen with a static, NUL-terminated name; the handle is checked.
        let handle = unsafe { libc::dlopen(c"libseccomp.so.2".as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let msg = unsafe { libc::dlerror() };
            let msg = if msg.is_null() {
                "not found".to_string()
            } else {
                // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
                unsafe { CStr::from_ptr(msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(BpfError::NoLibrary(msg));
        }
        let sym = |name: &'static CStr| -> Result<*mut c_void, BpfError> {
            // SAFETY: a live handle and a static, NUL-terminated symbol name.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                Err(BpfError::NoSymbol(static_name(name)))
            } else {
                Ok(p)
            }
        };
        let lib = (|| {
            // SAFETY: for each transmute, the symbol is libseccomp's public function of that name,
            // whose C signature (seccomp.h, libseccomp 2.x, stable ABI) is the pointer type's.
            unsafe {
                Ok(Lib {
                    handle,
                    init: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> Ctx>(
                        sym(c"seccomp_init")?,
                    ),
                    release: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ctx)>(sym(
                        c"seccomp_release",
                    )?),
                    arch_resolve_name: std::mem::transmute::<
                        *mut c_void,
                        unsafe extern "C" fn(*const c_char) -> u32,
                    >(sym(c"seccomp_arch_resolve_name")?),
                    arch_add: std::mem::transmute::<
                        *mut c_void,
                        unsafe extern "C" fn(Ctx, u32) -> c_int,
                    >(sym(c"seccomp_arch_add")?),
                    syscall_resolve_name: std::mem::transmute::<
                        *mut c_void,
                        unsafe extern "C" fn(*const c_char) -> c_int,
                    >(sym(
                        c"seccomp_syscall_resolve_name",
                    )?),
                    rule_add_array: std::mem::transmute::<
                        *mut c_void,
                        unsafe extern "C" fn(Ctx, u32, c_int, c_uint, *const ArgCmp) -> c_int,
                    >(sym(c"seccomp_rule_add_array")?),
                    export_bpf: std::mem::transmute::<
                        *mut c_void,
                        unsafe extern "C" fn(Ctx, c_int) -> c_int,
                    >(sym(c"seccomp_export_bpf")?),
                })
            }
        })();
        if lib.is_err() {
            // SAFETY: the handle came from dlopen and nothing of it is kept.
            unsafe { libc::dlclose(handle) };
        }
        lib
    }
}

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen; every filter made with it is released first
        // (`Filter` borrows the `Lib`).
        unsafe { libc::dlclose(self.handle) };
    }
}

fn static_name(name: &'static CStr) -> &'static str {
    name.to_str().unwrap_or("a symbol")
}

/// A libseccomp filter context, released on drop.
struct Filter<'l> {
    lib: &'l Lib,
    ctx: Ctx,
}

impl Drop for Filter<'_> {
    fn drop(&mut self) {
        // SAFETY: ctx came from seccomp_init of this library and is released once.
        unsafe { (self.lib.release)(self.ctx) }
    }
}

const SCMP_ACT_KILL_PROCESS: u32 = 0x8000_0000;
const SCMP_ACT_KILL_THREAD: u32 = 0x0000_0000;
const SCMP_ACT_TRAP: u32 = 0x0003_0000;
const SCMP_ACT_LOG: u32 = 0x7ffc_0000;
const SCMP_ACT_ALLOW: u32 = 0x7fff_0000;
const fn scmp_act_errno(e: u32) -> u32 {
    0x0005_0000 | (e & 0xffff)
}
const fn scmp_act_trace(e: u32) -> u32 {
    0x7ff0_0000 | (e & 0xffff)
}
/// libseccomp's answer for a syscall name it does not know.
const NR_SCMP_ERROR: c_int = -1;

/// An OCI action name as crun reads it. `SCMP_ACT_NOTIFY` needs a listener, which Rudder
/// never sets up: refused, so the runtime reports it rather than this.
fn action(name: &str, errno_ret: u32) -> Result<u32, BpfError> {
    Ok(match name.strip_prefix("SCMP_ACT_").unwrap_or("") {
        "ERRNO" => scmp_act_errno(errno_ret),
        "TRACE" => scmp_act_trace(errno_ret),
        "ALLOW" => SCMP_ACT_ALLOW,
        "KILL" | "KILL_THREAD" => SCMP_ACT_KILL_THREAD,
        "KILL_PROCESS" => SCMP_ACT_KILL_PROCESS,
        "TRAP" => SCMP_ACT_TRAP,
        "LOG" => SCMP_ACT_LOG,
        _ => return Err(BpfError::Profile(format!("action {name:?}"))),
    })
}

fn supports_errno(action: &str) -> bool {
    matches!(action, "SCMP_ACT_ERRNO" | "SCMP_ACT_TRACE")
}

/// An OCI comparison name as libseccomp's `enum scmp_compare`.
fn operator(name: &str) -> Result<c_int, BpfError> {
    Ok(match name.strip_prefix("SCMP_CMP_").unwrap_or("") {
        "NE" => 1,
        "LT" => 2,
        "LE" => 3,
        "EQ" => 4,
        "GE" => 5,
        "GT" => 6,
        "MASKED_EQ" => 7,
        _ => return Err(BpfError::Profile(format!("operator {name:?}"))),
    })
}

fn c_string(s: &str) -> Result<CString, BpfError> {
    CString::new(s).map_err(|_| BpfError::Profile(format!("{s:?} holds a NUL")))
}

fn field<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn u32_field(v: &Value, key: &str) -> Result<Option<u32>, BpfError> {
    field(v, key)
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| BpfError::Profile(format!("{key} is not a u32")))
        })
        .transpose()
}

/// The raw program (`struct sock_filter[]`) of `profile`, compiled as crun compiles it.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<u8>, BpfError> {
    // The profile in its OCI JSON form: the very names crun reads.
    let p = serde_json::to_value(profile).map_err(|e| BpfError::Profile(e.to_string()))?;
    let def_name = field(&p, "defaultAction")
        .and_then(Value::as_str)
        .ok_or_else(|| BpfError::Profile("no defaultAction".into()))?;
    let mut def_errno = libc::EPERM as u32;
    if let Some(e) = u32_field(&p, "defaultErrnoRet")? {
        if !supports_errno(def_name) {
            return Err(BpfError::Profile(format!(
                "defaultErrnoRet with action {def_name}"
            )));
        }
        def_errno = e;
    }
    let default_action = action(def_name, def_errno)?;
    let lib = Lib::open()?;
    // SAFETY: a plain call of this library's seccomp_init; the result is checked.
    let ctx = unsafe { (lib.init)(default_action) };
    if ctx.is_null() {
        return Err(BpfError::Call {
            call: "seccomp_init",
            errno: 0,
        });
    }
    let filter = Filter { lib: &lib, ctx };
    let check = |call: &'static str, ret: c_int| {
        if ret < 0 {
            Err(BpfError::Call { call, errno: -ret })
        } else {
            Ok(())
        }
    };
    for arch in field(&p, "architectures")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let arch = arch
            .as_str()
            .ok_or_else(|| BpfError::Profile("an architecture is not a string".into()))?;
        let name = c_string(
            &arch
                .strip_prefix("SCMP_ARCH_")
                .unwrap_or(arch)
                .to_lowercase(),
        )?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let token = unsafe { (lib.arch_resolve_name)(name.as_ptr()) };
        if token == 0 {
            return Err(BpfError::Profile(format!("unknown architecture {arch}")));
        }
        // SAFETY: a live context of this library.
        let ret = unsafe { (lib.arch_add)(filter.ctx, token) };
        if ret != -libc::EEXIST {
            check("seccomp_arch_add", ret)?;
        }
    }
    for rule in field(&p, "syscalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let act_name = field(rule, "action")
            .and_then(Value::as_str)
            .ok_or_else(|| BpfError::Profile("a rule has no action".into()))?;
        let mut errno = libc::EPERM as u32;
        if let Some(e) = u32_field(rule, "errnoRet")? {
            if !supports_errno(act_name) {
                return Err(BpfError::Profile(format!(
                    "errnoRet with action {act_name}"
                )));
            }
            errno = e;
        }
        let act = action(act_name, errno)?;
        if act == default_action {
            continue;
        }
        let args = match field(rule, "args") {
            None => None,
            Some(a) => Some(conditions(a)?),
        };
        for name in field(rule, "names")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name
                .as_str()
                .ok_or_else(|| BpfError::Profile("a syscall name is not a string".into()))?;
            let c = c_string(name)?;
            // SAFETY: a NUL-terminated name that outlives the call.
            let nr = unsafe { (lib.syscall_resolve_name)(c.as_ptr()) };
            if nr == NR_SCMP_ERROR {
                // crun ignores a name this libseccomp does not know (a newer syscall).
                continue;
            }
            let add = |conds: &[ArgCmp]| {
                let n = c_uint::try_from(conds.len()).unwrap_or(0);
                // SAFETY: a live context; `conds` holds `n` initialised entries that outlive
                // the call (libseccomp copies them).
                let ret = unsafe { (lib.rule_add_array)(filter.ctx, act, nr, n, conds.as_ptr()) };
                check("seccomp_rule_add_array", ret)
            };
            match &args {
                None => add(&[])?,
                // Two conditions on one argument cannot be ANDed by libseccomp: crun adds one
                // rule each (so they are ORed), and so does this.
                Some((conds, true)) => {
                    for c in conds {
                        add(std::slice::from_ref(c))?;
                    }
                }
                Some((conds, false)) => add(conds)?,
            }
        }
    }
    export(&filter)
}

/// A rule's conditions (at most six, as crun takes), and whether an argument repeats.
fn conditions(args: &Value) -> Result<(Vec<ArgCmp>, bool), BpfError> {
    let args = args
        .as_array()
        .ok_or_else(|| BpfError::Profile("args is not a list".into()))?;
    let mut seen = [0u8; 6];
    let mut repeats = false;
    let mut out = Vec::new();
    for a in args.iter().take(6) {
        let index = u32_field(a, "index")?.unwrap_or(0);
        let slot = seen
            .get_mut(index as usize)
            .ok_or_else(|| BpfError::Profile(format!("argument index {index}")))?;
        *slot += 1;
        repeats |= *slot > 1;
        let op = field(a, "op")
            .and_then(Value::as_str)
            .ok_or_else(|| BpfError::Profile("a condition has no op".into()))?;
        out.push(ArgCmp {
            arg: index,
            op: operator(op)?,
            datum_a: field(a, "value").and_then(Value::as_u64).unwrap_or(0),
            datum_b: field(a, "valueTwo").and_then(Value::as_u64).unwrap_or(0),
        });
    }
    Ok((out, repeats))
}

/// The filter's program, through a memfd (libseccomp writes it to a file descriptor).
fn export(filter: &Filter<'_>) -> Result<Vec<u8>, BpfError> {
    let io = |op| move |err| BpfError::Io { op, err };
    // SAFETY: memfd_create with a static name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: a live context and an open descriptor.
    let ret = unsafe { (filter.lib.export_bpf)(filter.ctx, file.as_raw_fd()) };
    if ret < 0 {
        return Err(BpfError::Call {
            call: "seccomp_export_bpf",
            errno: -ret,
        });
    }
    file.rewind().map_err(io("rewind the program"))?;
    let mut program = Vec::new();
    file.read_to_end(&mut program)
        .map_err(io("read the program"))?;
    if program.is_empty() || program.len() % 8 != 0 {
        return Err(BpfError::Profile(format!(
            "libseccomp made a program of {} bytes",
            program.len()
        )));
    }
    Ok(program)
}

#[cfg(test)]
mod tests;
