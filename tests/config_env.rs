//! `Config::from_env` against the launchers' conventions. One test, so that
//! nothing else in this binary reads the environment while it changes.

use meshmem::{Config, Error};

const VARS: &[&str] = &[
    "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT", "MESHMEM_MESH", "MESHMEM_GROUP",
    "MESHMEM_PAGE_SIZE", "MESHMEM_NODE_CAPACITY", "MESHMEM_WINDOW_SIZE", "MESHMEM_WINDOW_BASE",
    "MESHMEM_JOIN_TIMEOUT_MS",
];

fn with_env(pairs: &[(&str, &str)]) -> Result<Config, Error> {
    for var in VARS {
        std::env::remove_var(var);
    }
    for (key, value) in pairs {
        std::env::set_var(key, value);
    }
    Config::from_env()
}

#[test]
fn launcher_conventions_and_bad_values() {
    let torchrun = with_env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]).unwrap();
    assert_eq!((torchrun.rank, torchrun.size), (Some(3), Some(8)));
    assert_eq!(torchrun.group.as_deref(), Some("torch-127.0.0.1-29500"));

    let mpi = with_env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4"), ("MESHMEM_GROUP", "g")]).unwrap();
    assert_eq!((mpi.rank, mpi.size, mpi.group.as_deref()), (Some(1), Some(4), Some("g")));

    let slurm = with_env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6"), ("SLURM_JOB_ID", "77"), ("SLURM_STEP_ID", "0")]).unwrap();
    assert_eq!((slurm.rank, slurm.size), (Some(5), Some(6)));
    assert_eq!(slurm.group.as_deref(), Some("slurm-77.0"));

    let sized = with_env(&[
        ("MESHMEM_MESH", "2x2x2:torus"),
        ("MESHMEM_PAGE_SIZE", "64K"),
        ("MESHMEM_NODE_CAPACITY", "512M"),
        ("MESHMEM_WINDOW_SIZE", "64G"),
        ("MESHMEM_WINDOW_BASE", "0x200000000000"),
        ("MESHMEM_JOIN_TIMEOUT_MS", "1500"),
    ])
    .unwrap();
    assert!(sized.mesh.unwrap().wrap);
    assert_eq!(sized.page_size, 64 << 10);
    assert_eq!(sized.node_capacity, 512 << 20);
    assert_eq!(sized.window_size, 64 << 30);
    assert_eq!(sized.window_base, Some(0x2000_0000_0000));
    assert_eq!(sized.join_timeout.as_millis(), 1500);

    for (var, value) in [
        ("RANK", "-1"),
        ("MESHMEM_MESH", "2x0x2"),
        ("MESHMEM_PAGE_SIZE", "huge"),
        ("MESHMEM_NODE_CAPACITY", "1.5G"),
        ("MESHMEM_WINDOW_BASE", "zz"),
        ("MESHMEM_JOIN_TIMEOUT_MS", "soon"),
    ] {
        let err = with_env(&[(var, value)]).unwrap_err().to_string();
        assert!(err.contains(value), "{var}={value}: {err}");
    }

    // A group larger than one needs a rank.
    let err = Config { size: Some(4), ..Config::default() };
    let err = meshmem::Pool::join(err).unwrap_err().to_string();
    assert!(err.contains("RANK"), "{err}");
    for var in VARS {
        std::env::remove_var(var);
    }
}
