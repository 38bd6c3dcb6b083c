-- Questions users ask of a freqtag run, answered in DuckDB SQL from the run's output folder.
--
-- Run it (OUT is the folder given to `freqtag run --out`, default out/<pipeline name>):
--
--   duckdb -cmd "SET VARIABLE out = 'out/paper-resnet32-cifar10'" < examples/questions.sql
--
-- or, inside an interactive duckdb session:
--
--   SET VARIABLE out = 'out/paper-resnet32-cifar10';
--   .read examples/questions.sql
--
-- or from Python: tests/python/check_examples.py OUT runs this file through the duckdb module.
-- Without a `SET VARIABLE out` beforehand the file falls back to the default below. Needs DuckDB
-- 1.3 or later (SQL variables, `lambda` syntax); written and tested with 2.0.1.
--
-- Everything is read from scores/, the per-(layer, channel, term, label group) aggregates:
-- label IS NULL rows are over all images, the others over one class (written when the images
-- carry labels and output.per_class = true). Each score has <score>_mean and <score>_std over
-- the images of the group; n_images counts them.

-- Settings. `coalesce` keeps a value set before this file is read.
SET VARIABLE out = coalesce(getvariable('out'), 'out/paper-resnet32-cifar10');
-- (a): how many neurons to list per layer.
SET VARIABLE top_n = coalesce(getvariable('top_n'), 5);
-- (b): the intermodulation threshold, in dB of the standard SNR (see question (b)).
SET VARIABLE im_threshold_db = coalesce(getvariable('im_threshold_db'), 3.0);

-- All scores parts of the run. The recursive glob finds both layouts: OUT/scores/ (one
-- process) and OUT/process-<i>/scores/ (a cluster run: every process writes the score keys it
-- owns, and the union is the whole table). Parts inside a `.freqtag` folder belong to a run
-- that has not finished (the work folder of `--resume`) and are left out. Do not point `out`
-- at a folder holding both layouts (a one-process run and a cluster run written into the same
-- folder): every row would then be read twice. examples/questions.py refuses that case.
CREATE OR REPLACE TEMP VIEW freqtag_scores AS
SELECT * EXCLUDE (filename)
FROM read_parquet(getvariable('out') || '/**/scores/*.parquet', filename = true)
WHERE filename NOT LIKE '%/.freqtag/%';

-- Sorts layer names in network order: numeric parts compare as numbers, so features.2 comes
-- before features.10 (MobileNetV2) and layer1.4 before layer2.0 (ResNet).
CREATE OR REPLACE TEMP MACRO layer_order(name) AS
    list_transform(string_split(name, '.'),
                   lambda part: CASE WHEN regexp_full_match(part, '[0-9]+') THEN lpad(part, 12, '0')
                                ELSE part END);


-- (a) The top neurons of each layer at the intermodulation term f1+f2.
--
-- "Mean SNR" here is snr_db_mean: the mean over all images of the standard SNR in dB (the
-- term's amplitude over the mean of `neighbours` bins each side after `skip`, METHOD.md
-- section 3). A mean of dB values is the geometric mean of the SNRs, so one image with a huge
-- ratio cannot carry a neuron to the top; snr_mean (the plain mean of the ratio) is shown
-- beside it. The lattice-aware SNR is not used: without stimulus noise it measures float
-- rounding (run.json, scoring.rounding_sensitive). Ties go to the lower channel; neurons with
-- no SNR at the term (its neighbourhood leaves the spectrum) are not ranked.
WITH ranked AS (
    SELECT layer, channel, snr_db_mean, snr_db_std, snr_mean, n_images,
           row_number() OVER (PARTITION BY layer ORDER BY snr_db_mean DESC, channel) AS rank
    FROM freqtag_scores
    WHERE term = 'f1+f2' AND label IS NULL AND snr_db_mean IS NOT NULL
)
SELECT layer, rank, channel, snr_db_mean, snr_db_std, snr_mean, n_images
FROM ranked
WHERE rank <= getvariable('top_n')
ORDER BY layer_order(layer), rank;


-- (b) The share of neurons per layer with an intermodulation response.
--
-- Definition: a neuron (layer, channel) has an intermodulation response when, at one or more
-- of the intermodulation terms (term_kind = 'intermod': f1+f2, f2-f1, ... up to
-- intermod_order), its mean over all images of the standard SNR in dB (snr_db_mean) is at
-- least im_threshold_db, 3 dB by default: a geometric-mean SNR of about 2, the term's
-- amplitude twice the mean of its neighbourhood. Intermodulation is the non-linear response
-- that only a neuron combining both tagged regions can give (METHOD.md sections 1 and 3).
-- The standard SNR is a conservative test here: on the paper's stimulus the response lattice
-- is every third bin, so the neighbourhood of a term holds two other lattice bins whose real
-- responses raise the baseline. A term whose neighbourhood leaves the spectrum (f2-f1 = 1.5 Hz
-- at 0.5 Hz bins runs into DC) has no SNR and cannot count. Using the aggregates (scores/)
-- rather than the per-image rows (neurons/) keeps the answer cheap and available when
-- output.neurons = false.
WITH per_neuron AS (
    SELECT layer, channel,
           max(snr_db_mean) FILTER (WHERE term_kind = 'intermod') AS best_intermod_snr_db
    FROM freqtag_scores
    WHERE label IS NULL
    GROUP BY layer, channel
)
SELECT layer,
       count(*) AS neurons,
       count(*) FILTER (WHERE best_intermod_snr_db >= getvariable('im_threshold_db'))
           AS responsive,
       responsive / neurons AS share
FROM per_neuron
GROUP BY layer
ORDER BY layer_order(layer);


-- (c) Per-class differences: for each layer, the class whose images give the highest mean of
-- mean_snr_db (the authors' overall score of a neuron, averaged over the layer's neurons),
-- the lowest, and the spread between classes.
--
-- mean_snr_db is one value per (image, neuron), repeated on each of the neuron's term rows, so
-- one row per (layer, channel, label) is kept (the values are equal; min picks one). The
-- class mean of a layer is the mean over its neurons of mean_snr_db_mean; as every image
-- gives every neuron, that is the mean over all (image, neuron) pairs of the class. spread_db
-- is best minus worst; between_class_sd the sample sd of the class means. Ties go to the
-- lower label. Read with care: classes hold few images in small runs (best_class_images),
-- and without stimulus noise mean_snr_db is rounding-sensitive (METHOD.md section 3).
-- Without labelled rows (labels = "none", or output.per_class = false) the answer is a single
-- row whose note says so.
WITH per_neuron AS (
    SELECT layer, channel, label,
           min(mean_snr_db_mean) AS mean_snr_db,
           min(n_images) AS n_images
    FROM freqtag_scores
    WHERE label IS NOT NULL
    GROUP BY layer, channel, label
),
per_class AS (
    SELECT layer, label, avg(mean_snr_db) AS mean_snr_db, max(n_images) AS n_images
    FROM per_neuron
    GROUP BY layer, label
),
per_layer AS (
    SELECT layer,
           count(*) AS classes,
           first(label ORDER BY mean_snr_db DESC, label) AS best_class,
           max(mean_snr_db) AS best_mean_snr_db,
           first(n_images ORDER BY mean_snr_db DESC, label) AS best_class_images,
           first(label ORDER BY mean_snr_db ASC, label) AS worst_class,
           min(mean_snr_db) AS worst_mean_snr_db,
           max(mean_snr_db) - min(mean_snr_db) AS spread_db,
           stddev_samp(mean_snr_db) AS between_class_sd,
           CAST(NULL AS VARCHAR) AS note
    FROM per_class
    GROUP BY layer
)
SELECT * FROM (
    SELECT * FROM per_layer
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           'no labelled rows in scores/: the images carry no labels (source.labels = "none") '
           || 'or the run had output.per_class = false'
    WHERE NOT EXISTS (SELECT 1 FROM per_layer)
)
ORDER BY layer_order(layer);
