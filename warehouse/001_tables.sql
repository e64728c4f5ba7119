-- Tables of the NDS warehouse. Executed in order by nds/platform/warehouse.py on every write
-- connection, in one transaction; idempotent. Warehouses of older releases are upgraded in place
-- (created_at TIMESTAMP -> TIMESTAMPTZ, taken as UTC) by warehouse.py, then stamped below.
CREATE TABLE IF NOT EXISTS schema_version (
    version         INTEGER PRIMARY KEY,   -- nds.platform.warehouse.SCHEMA_VERSION
    applied_at      TIMESTAMPTZ NOT NULL
);

-- One row per completed index build; everything else hangs off index_version.
CREATE TABLE IF NOT EXISTS index_versions (
    index_version   VARCHAR PRIMARY KEY,
    created_at      TIMESTAMPTZ NOT NULL,
    params          JSON NOT NULL,      -- params.yaml sections used by the four stages
    corpus_md5      VARCHAR,            -- md5 of data/ recorded by DVC (data.dvc)
    git_rev         VARCHAR,            -- commit of the workspace, when it is a git repo
    corpus_profile  VARCHAR,
    n_samples       BIGINT NOT NULL,
    n_datasets      INTEGER NOT NULL,
    k               INTEGER NOT NULL,
    nmi_dataset     DOUBLE,             -- normalized mutual information, cluster vs domain
    bundle_sha256   VARCHAR NOT NULL,
    stage_seconds   JSON
);

-- The source catalog as indexed by a version (holdout samples are never indexed).
CREATE TABLE IF NOT EXISTS samples (
    index_version   VARCHAR NOT NULL,
    sample_id       VARCHAR NOT NULL,
    dataset         VARCHAR NOT NULL,
    uri             VARCHAR NOT NULL,
    label           VARCHAR NOT NULL,
    split           VARCHAR NOT NULL,
    sha256          VARCHAR NOT NULL,
    PRIMARY KEY (index_version, sample_id)
);

CREATE TABLE IF NOT EXISTS clusters (
    index_version     VARCHAR NOT NULL,
    expert            INTEGER NOT NULL,
    name              VARCHAR,
    size              BIGINT NOT NULL,
    top_dataset       VARCHAR,
    top_dataset_share DOUBLE,
    rotation_accuracy DOUBLE,
    expert_sha256     VARCHAR,
    PRIMARY KEY (index_version, expert)
);

CREATE TABLE IF NOT EXISTS sample_weights (
    index_version   VARCHAR NOT NULL,
    sample_id       VARCHAR NOT NULL,
    expert          INTEGER NOT NULL,
    weight          DOUBLE NOT NULL,    -- w_k(x) = 1/|S_k|
    PRIMARY KEY (index_version, sample_id, expert)
);
