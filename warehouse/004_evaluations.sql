-- Transfer evaluations (nds/evaluate/): one row per (task, strategy, budget, seed) run.
-- An evaluation run replaces its own rows in one transaction.
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id     VARCHAR NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    index_version     VARCHAR NOT NULL,
    task              VARCHAR NOT NULL,
    domain            VARCHAR,            -- the task's source domain (NULL for a user's own data)
    strategy          VARCHAR NOT NULL,   -- nds, uniform, all, none
    budget            BIGINT NOT NULL,    -- source samples pre-trained on (0 for none)
    budget_fraction   DOUBLE NOT NULL,
    seed              INTEGER NOT NULL,
    accuracy          DOUBLE NOT NULL,    -- test accuracy after fine-tuning
    domain_precision  DOUBLE,             -- share of the selection from the task's domain
    n_pretrain        BIGINT NOT NULL,
    pretrain_seconds  DOUBLE,
    finetune_seconds  DOUBLE,
    params            JSON,               -- recipe, shots, temperature
    PRIMARY KEY (evaluation_id, task, strategy, budget, seed)
);
