"""Prediction streams its inputs, and a loaded run never grows the shared cache (issue 15)."""

import numpy as np

import medtl
from medtl.data import load_dataset
from medtl.errors import DataReadError
from medtl.transfer import fitted


def test_network_prediction_streams_in_chunks_with_the_same_probabilities(blob_data,
                                                                          monkeypatch):
    ds = load_dataset(blob_data)
    clf = medtl.TransferClassifier(strategy="fine-tune", weights="random", image_size=32,
                                   epochs=1, batch_size=4, quiet=True)
    clf.fit(ds.split("train"), ds.split("val"))
    model, test = clf.model_, ds.split("test")
    model.options.skip_bad = True
    bad = test.records[3].path
    real_read = type(test).read

    def read(self, i):  # one unreadable image: later batches shift by one in both paths
        if self.records[i].path == bad:
            raise DataReadError(str(bad), "damaged")
        return real_read(self, i)

    monkeypatch.setattr(type(test), "read", read)
    whole = model.predict_proba(test)  # PREDICT_CHUNK > len(test): one chunk
    sizes = []
    real_iter = fitted.iter_decoded

    def spy(*args, **kwargs):
        for part in real_iter(*args, **kwargs):
            sizes.append(len(part[1]))
            yield part

    monkeypatch.setattr(fitted, "iter_decoded", spy)
    monkeypatch.setattr(fitted, "PREDICT_CHUNK", 5)  # rounded up to whole batches of 4
    chunked = model.predict_proba(test)
    assert sizes == [8, 8, 7] and len(test) == 24
    assert np.isnan(whole[3]).all() and np.isfinite(np.delete(whole, 3, axis=0)).all()
    np.testing.assert_array_equal(chunked, whole)


def test_a_loaded_run_reads_the_feature_cache_and_never_adds_to_it(blob_data, tmp_path,
                                                                   fresh_cache):
    ds = load_dataset(blob_data)
    clf = medtl.TransferClassifier(strategy="feature-extractor", weights="random",
                                   image_size=32, engine="torch", quiet=True)
    clf.fit(ds.split("train"), ds.split("val"))
    folder = clf.model_.extractor.store.directory
    assert folder.is_relative_to(fresh_cache)

    def listing():
        return {p.name: p.stat().st_size for p in folder.rglob("*")}

    before = listing()
    loaded = medtl.load_run(medtl.save_run(clf, tmp_path / "run").path).load_model(quiet=True)
    extractor = loaded.model_.extractor
    assert extractor.key == clf.model_.extractor.key
    loaded.predict_proba(ds.split("test"))  # new images: computed, not kept
    assert extractor.n_computed == len(ds.split("test")) and listing() == before
    loaded.predict_proba(ds.split("train"))  # what training cached is read
    assert extractor.n_computed == len(ds.split("test")) and listing() == before
