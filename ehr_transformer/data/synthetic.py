"""A synthetic MEDS cohort with realistic structure and a learnable outcome.

Each subject has static demographics (``GENDER//F|M``, ``ETHNICITY//...``, null time), ``MEDS_BIRTH``
(age 18-90 at the first admission), one or more hospital admissions over a few years
(``ADMISSION//EMERGENCY|URGENT|ELECTIVE`` ... ``DISCHARGE//HOME|SNF|REHAB|HOME_HEALTH|DIED``),
vitals (LOINC, several times in the first 24 h, then every ~8 h), lab panels (LOINC, 1-3 draws in
the first 24 h, then daily; a blood culture with a text value), medications (RXNORM, some linked to
diagnoses: insulin with diabetes, furosemide with heart failure, antibiotics with infection),
procedures (ICD10PCS), diagnoses at discharge (ICD10CM: ~110 codes with Zipf-like frequency, chronic
comorbidities re-coded at each admission) and ``MEDS_DEATH``. Codes are real-looking but the data are
entirely synthetic.

Tasks (``labels``), one row per admission lasting >= 24 h, ``prediction_time`` = admission + 24 h:

- ``in_hospital_mortality`` (boolean): death during the admission, after ``prediction_time``. The
  probability is a logistic function of what is *visible* at ``prediction_time`` only: age, chronic
  diagnoses coded in earlier admissions (heart failure, COPD, CKD, cancer), the emergency admission
  type, the maximum lactate and creatinine of the first 24 h, the heart-rate and systolic-pressure
  trends over the first 24 h (last minus first measurement) and two interactions (high lactate x low
  pressure, age x creatinine). Code counts alone do not capture it. Prevalence is about 10-12 %.
  After ``prediction_time`` a dying subject's vitals deteriorate (the data path cuts those events).
- ``long_length_of_stay`` (boolean): the stay lasts more than 7 days.

Hospitals (:class:`HospitalProfile`, default: none, which changes nothing): several synthetic "hospitals" that
differ in how they code (a code system renamed, e.g. ``LOINC//2524-7`` written ``LAB//2524-7``), whom they treat
(older, frailer or sicker subjects, more emergency admissions) and what drives their outcome (``physiology``: the
logistic mortality model above; ``history``: chronic diagnoses of earlier admissions and age weigh more, labs and
vitals less). Used by the model-selection example and benchmark to build zoos of checkpoints whose right answer
is known::

    generate_synthetic_cohort(1500, seed=3, profile=HospitalProfile(code_systems={"LOINC": "LAB"}, age_shift=8))

Nothing happens after ``MEDS_DEATH``: a subject who dies has no later admission or event. Splits are
by subject, 70 / 15 / 15 % train / tuning / held_out. Everything is deterministic for
``(n_subjects, seed)``; subjects are generated in fixed chunks of :data:`CHUNK_SIZE` with numpy,
so 100,000 subjects (~40 million events) are written shard by shard in bounded memory::

    ehr-transformer synthetic --num_subjects 3000 --output_dir synthetic_meds
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .labels import LABEL_SCHEMA
from .meds import DATA_SCHEMA, SPLITS, validate_events
from .writer import MEDSWriter

CHUNK_SIZE = 2000  # subjects generated together; fixed so results do not depend on sharding
STUDY_START = np.datetime64("2015-01-01T00:00", "us").astype(np.int64)  # microseconds since epoch
US_PER_HOUR = 3_600_000_000
TASKS = ("in_hospital_mortality", "long_length_of_stay")

# ---------------------------------------------------------------------------------------------- vocabulary

ETHNICITIES = ["WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER", "UNKNOWN"]
ETHNICITY_P = [0.62, 0.14, 0.10, 0.06, 0.05, 0.03]
ADMISSION_TYPES = ["EMERGENCY", "URGENT", "ELECTIVE"]
DISCHARGES = ["HOME", "HOME_HEALTH", "SNF", "REHAB", "DIED"]

# chronic comorbidities: (name, ICD10CM code, description, base logit, per-decade-of-age, per-frailty)
CHRONIC = [
    ("htn", "I10", "Essential (primary) hypertension", -0.6, 0.45, 0.3),
    ("dm", "E11.9", "Type 2 diabetes mellitus without complications", -1.6, 0.25, 0.4),
    ("chf", "I50.9", "Heart failure, unspecified", -3.0, 0.45, 0.6),
    ("copd", "J44.9", "Chronic obstructive pulmonary disease, unspecified", -2.6, 0.35, 0.5),
    ("ckd", "N18.3", "Chronic kidney disease, stage 3", -2.8, 0.45, 0.5),
    ("cad", "I25.10", "Atherosclerotic heart disease of native coronary artery", -2.2, 0.45, 0.3),
    ("afib", "I48.91", "Unspecified atrial fibrillation", -2.9, 0.55, 0.3),
    ("cancer", "C34.90", "Malignant neoplasm of unspecified part of bronchus or lung", -3.4, 0.3, 0.5),
    ("hld", "E78.5", "Hyperlipidemia, unspecified", -1.0, 0.35, 0.1),
]
CHRONIC_INDEX = {name: i for i, (name, *_rest) in enumerate(CHRONIC)}

# acute reasons for an admission: (name, ICD10CM code, description)
ACUTE = [
    ("none", None, None),
    ("sepsis", "A41.9", "Sepsis, unspecified organism"),
    ("hf", "I50.23", "Acute on chronic systolic (congestive) heart failure"),
    ("aki", "N17.9", "Acute kidney failure, unspecified"),
    ("pneumonia", "J18.9", "Pneumonia, unspecified organism"),
    ("copd_exac", "J44.1", "Chronic obstructive pulmonary disease with (acute) exacerbation"),
]
SECONDARY_DX = {
    "shock": ("R65.21", "Severe sepsis with septic shock"),
    "resp_failure": ("J96.01", "Acute respiratory failure with hypoxia"),
    "hyponatremia": ("E87.1", "Hypo-osmolality and hyponatremia"),
    "hyperkalemia": ("E87.5", "Hyperkalemia"),
    "anemia": ("D64.9", "Anemia, unspecified"),
}
FILLER_DX = [
    ("N39.0", "Urinary tract infection, site not specified"),
    ("K21.9", "Gastro-esophageal reflux disease"),
    ("F32.9", "Major depressive disorder, single episode"),
    ("F41.9", "Anxiety disorder, unspecified"),
    ("E03.9", "Hypothyroidism, unspecified"),
    ("G47.33", "Obstructive sleep apnea"),
    ("M19.90", "Unspecified osteoarthritis"),
    ("R07.9", "Chest pain, unspecified"),
    ("R55", "Syncope and collapse"),
    ("Z79.4", "Long term (current) use of insulin"),
    ("Z87.891", "Personal history of nicotine dependence"),
    ("F17.210", "Nicotine dependence, cigarettes"),
    ("E66.9", "Obesity, unspecified"),
    ("K59.00", "Constipation, unspecified"),
    ("R50.9", "Fever, unspecified"),
    ("R06.02", "Shortness of breath"),
    ("I95.9", "Hypotension, unspecified"),
    ("E86.0", "Dehydration"),
    ("E83.42", "Hypomagnesemia"),
    ("E87.6", "Hypokalemia"),
    ("D69.6", "Thrombocytopenia, unspecified"),
    ("R41.82", "Altered mental status"),
    ("G93.41", "Metabolic encephalopathy"),
    ("I21.4", "Non-ST elevation myocardial infarction"),
    ("I63.9", "Cerebral infarction, unspecified"),
    ("I26.99", "Other pulmonary embolism"),
    ("I82.409", "Acute embolism and thrombosis of deep veins of lower extremity"),
    ("K92.2", "Gastrointestinal hemorrhage, unspecified"),
    ("K85.90", "Acute pancreatitis"),
    ("K80.20", "Calculus of gallbladder"),
    ("K57.30", "Diverticulosis of large intestine"),
    ("K70.30", "Alcoholic cirrhosis of liver"),
    ("F10.20", "Alcohol dependence, uncomplicated"),
    ("F10.239", "Alcohol dependence with withdrawal"),
    ("F05", "Delirium due to known physiological condition"),
    ("F03.90", "Unspecified dementia"),
    ("G40.909", "Epilepsy, unspecified"),
    ("G20", "Parkinson's disease"),
    ("M81.0", "Age-related osteoporosis"),
    ("S72.001A", "Fracture of unspecified part of neck of femur"),
    ("W19.XXXA", "Unspecified fall"),
    ("L89.159", "Pressure ulcer of sacral region"),
    ("L03.115", "Cellulitis of right lower limb"),
    ("A04.72", "Enterocolitis due to Clostridium difficile"),
    ("B96.20", "Escherichia coli as the cause of diseases"),
    ("J90", "Pleural effusion"),
    ("J81.0", "Acute pulmonary edema"),
    ("J45.909", "Unspecified asthma"),
    ("J69.0", "Aspiration pneumonitis"),
    ("I27.20", "Pulmonary hypertension, unspecified"),
    ("I35.0", "Nonrheumatic aortic valve stenosis"),
    ("I47.1", "Supraventricular tachycardia"),
    ("I49.9", "Cardiac arrhythmia, unspecified"),
    ("I73.9", "Peripheral vascular disease"),
    ("I70.209", "Atherosclerosis of native arteries of extremities"),
    ("E11.22", "Type 2 diabetes mellitus with diabetic chronic kidney disease"),
    ("E11.65", "Type 2 diabetes mellitus with hyperglycemia"),
    ("E11.40", "Type 2 diabetes with neuropathy"),
    ("E10.9", "Type 1 diabetes mellitus without complications"),
    ("E05.90", "Thyrotoxicosis"),
    ("E55.9", "Vitamin D deficiency"),
    ("D50.9", "Iron deficiency anemia"),
    ("D62", "Acute posthemorrhagic anemia"),
    ("D68.9", "Coagulation defect, unspecified"),
    ("N40.0", "Benign prostatic hyperplasia"),
    ("N20.0", "Calculus of kidney"),
    ("N28.9", "Disorder of kidney and ureter"),
    ("R33.9", "Retention of urine"),
    ("R11.2", "Nausea with vomiting"),
    ("R10.9", "Unspecified abdominal pain"),
    ("R51.9", "Headache"),
    ("R53.1", "Weakness"),
    ("R63.4", "Abnormal weight loss"),
    ("R73.9", "Hyperglycemia, unspecified"),
    ("R79.89", "Abnormal findings of blood chemistry"),
    ("Z66", "Do not resuscitate"),
    ("Z79.01", "Long term (current) use of anticoagulants"),
    ("Z79.02", "Long term (current) use of antithrombotics"),
    ("Z95.1", "Presence of aortocoronary bypass graft"),
    ("Z95.0", "Presence of cardiac pacemaker"),
    ("Z99.2", "Dependence on renal dialysis"),
    ("Z86.73", "Personal history of TIA and cerebral infarction"),
    ("Z85.3", "Personal history of breast cancer"),
    ("Z88.0", "Allergy status to penicillin"),
    ("Z91.81", "History of falling"),
    ("Z68.41", "BMI 40.0-44.9, adult"),
    ("Z72.0", "Tobacco use"),
    ("Z59.0", "Homelessness"),
    ("Z74.09", "Other reduced mobility"),
    ("Z93.0", "Tracheostomy status"),
    ("Z96.641", "Presence of right artificial hip joint"),
    ("C18.9", "Malignant neoplasm of colon"),
    ("C50.919", "Malignant neoplasm of breast"),
    ("C61", "Malignant neoplasm of prostate"),
    ("C78.7", "Secondary malignant neoplasm of liver"),
    ("C79.51", "Secondary malignant neoplasm of bone"),
    ("C90.00", "Multiple myeloma"),
    ("B20", "Human immunodeficiency virus disease"),
    ("B18.2", "Chronic viral hepatitis C"),
    ("U07.1", "COVID-19"),
    ("T81.4XXA", "Infection following a procedure"),
    ("T82.7XXA", "Infection due to cardiac and vascular devices"),
    ("Y92.239", "Hospital as place of occurrence"),
    ("M54.5", "Low back pain"),
    ("M62.81", "Muscle weakness (generalized)"),
    ("M10.9", "Gout, unspecified"),
    ("H91.90", "Unspecified hearing loss"),
    ("H54.7", "Unspecified visual loss"),
]
PROCEDURES = [
    ("5A1955Z", "Respiratory ventilation, greater than 96 consecutive hours"),
    ("5A1D70Z", "Performance of urinary filtration, intermittent (hemodialysis)"),
    ("02HV33Z", "Insertion of infusion device into superior vena cava, percutaneous"),
    ("30233N1", "Transfusion of nonautologous red blood cells into peripheral vein"),
    ("0BH17EZ", "Insertion of endotracheal airway into trachea"),
    ("3E0G76Z", "Introduction of nutritional substance into upper GI"),
    ("0DJ08ZZ", "Inspection of upper intestinal tract"),
    ("B246ZZZ", "Ultrasonography of right and left heart"),
    ("BW28ZZZ", "CT scan of abdomen and pelvis"),
    ("B020ZZZ", "CT scan of head"),
    ("4A023N7", "Measurement of cardiac sampling, left heart"),
    ("027034Z", "Dilation of coronary artery with drug-eluting stent"),
    ("0W9930Z", "Drainage of right pleural cavity"),
    ("0T9B70Z", "Drainage of bladder with drainage device"),
    ("0FT44ZZ", "Resection of gallbladder, laparoscopic"),
    ("0SR9019", "Replacement of right hip joint"),
    ("0DTJ4ZZ", "Resection of appendix, laparoscopic"),
    ("5A2204Z", "Restoration of cardiac rhythm, single"),
    ("0JH63DZ", "Insertion of vascular access device into chest"),
    ("BB24ZZZ", "CT scan of bilateral lungs"),
]
MEDICATIONS = [  # (RxNorm ingredient id, name)
    ("161", "acetaminophen"),
    ("5224", "heparin"),
    ("7213", "ipratropium"),
    ("40790", "pantoprazole"),
    ("9863", "sodium chloride"),
    ("8591", "potassium chloride"),
    ("26225", "ondansetron"),
    ("83367", "atorvastatin"),
    ("6918", "metoprolol"),
    ("1191", "aspirin"),
    ("67108", "enoxaparin"),
    ("7052", "morphine"),
    ("7804", "oxycodone"),
    ("29046", "lisinopril"),
    ("17767", "amlodipine"),
    ("11289", "warfarin"),
    ("10582", "levothyroxine"),
    ("25480", "gabapentin"),
    ("6809", "metformin"),
    ("2193", "ceftriaxone"),
    ("18631", "azithromycin"),
    ("82122", "levofloxacin"),
    ("8640", "prednisone"),
    ("435", "albuterol"),
    ("3443", "diltiazem"),
    ("4850", "glucose"),
    ("6585", "magnesium sulfate"),
    ("2670", "codeine"),
    ("32968", "clopidogrel"),
    ("36437", "sertraline"),
    ("596", "alprazolam"),
    ("6470", "lorazepam"),
    ("5640", "ibuprofen"),
    ("4603", "furosemide"),
    ("5856", "insulin"),
    ("11124", "vancomycin"),
    ("152834", "piperacillin/tazobactam"),
    ("7512", "norepinephrine"),
]
LINKED_MEDS = {
    "furosemide": "4603",
    "insulin": "5856",
    "vancomycin": "11124",
    "piptazo": "152834",
    "norepinephrine": "7512",
    "albuterol": "435",
    "ipratropium": "7213",
    "prednisone": "8640",
}
# labs: (key, LOINC, description with unit, decimals)
LABS = [
    ("lactate", "2524-7", "Lactate [Moles/volume] in Serum or Plasma (mmol/L)", 1),
    ("creatinine", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma (mg/dL)", 2),
    ("sodium", "2951-2", "Sodium [Moles/volume] in Serum or Plasma (mmol/L)", 0),
    ("potassium", "2823-3", "Potassium [Moles/volume] in Serum or Plasma (mmol/L)", 1),
    ("wbc", "6690-2", "Leukocytes [#/volume] in Blood (10*3/uL)", 1),
    ("hemoglobin", "718-7", "Hemoglobin [Mass/volume] in Blood (g/dL)", 1),
    ("glucose", "2345-7", "Glucose [Mass/volume] in Serum or Plasma (mg/dL)", 0),
    ("bun", "3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma (mg/dL)", 0),
    ("platelets", "777-3", "Platelets [#/volume] in Blood (10*3/uL)", 0),
    ("bicarbonate", "1963-8", "Bicarbonate [Moles/volume] in Serum or Plasma (mmol/L)", 0),
]
LAB_INDEX = {key: i for i, (key, *_rest) in enumerate(LABS)}
VITALS = [
    ("hr", "8867-4", "Heart rate (beats/min)", 0),
    ("rr", "9279-1", "Respiratory rate (breaths/min)", 0),
    ("spo2", "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry (%)", 0),
    ("sbp", "8480-6", "Systolic blood pressure (mm[Hg])", 0),
    ("dbp", "8462-4", "Diastolic blood pressure (mm[Hg])", 0),
    ("temp", "8310-5", "Body temperature (Cel)", 1),
]
CULTURE = ("600-7", "Bacteria identified in Blood by Culture")
TEXT_VALUES = ["NEGATIVE", "POSITIVE"]


def _build_vocabulary() -> tuple[list[str], list[str | None], dict[str, int]]:
    codes: list[str] = []
    descriptions: list[str | None] = []

    def add(code: str, description: str | None) -> None:
        codes.append(code)
        descriptions.append(description)

    for sex, desc in (("F", "Female"), ("M", "Male")):
        add(f"GENDER//{sex}", desc)
    for eth in ETHNICITIES:
        add(f"ETHNICITY//{eth}", eth.title())
    add("MEDS_BIRTH", "Birth")
    add("MEDS_DEATH", "Death")
    for adm in ADMISSION_TYPES:
        add(f"ADMISSION//{adm}", f"Hospital admission, {adm.lower()}")
    for dis in DISCHARGES:
        add(f"DISCHARGE//{dis}", f"Hospital discharge to {dis.lower()}")
    for _name, code, desc, *_rest in CHRONIC:
        add(f"ICD10CM//{code}", desc)
    for _name, code, desc in ACUTE[1:]:
        add(f"ICD10CM//{code}", desc)
    for code, desc in SECONDARY_DX.values():
        add(f"ICD10CM//{code}", desc)
    for code, desc in FILLER_DX:
        add(f"ICD10CM//{code}", desc)
    for code, desc in PROCEDURES:
        add(f"ICD10PCS//{code}", desc)
    for code, name in MEDICATIONS:
        add(f"RXNORM//{code}", name)
    for _key, code, desc, _dec in LABS + VITALS:
        add(f"LOINC//{code}", desc)
    add(f"LOINC//{CULTURE[0]}", CULTURE[1])
    return codes, descriptions, {c: i for i, c in enumerate(codes)}


CODES, CODE_DESCRIPTIONS, CODE_INDEX = _build_vocabulary()


def _ix(code: str) -> int:
    return CODE_INDEX[code]


def synthetic_codes_metadata(profile: HospitalProfile | None = None) -> pl.DataFrame:
    """``metadata/codes.parquet`` content for the synthetic vocabulary (code, description, parent_codes), with
    the code systems of `profile` renamed."""
    profile = profile or DEFAULT_PROFILE
    frame = pl.DataFrame(
        {"code": CODES, "description": CODE_DESCRIPTIONS},
        schema={"code": pl.String, "description": pl.String},
    )
    frame = frame.with_columns(profile.rename(pl.col("code")).alias("code"))
    parents = [[c.split("//")[0]] if "//" in c else [] for c in frame["code"]]
    return frame.with_columns(pl.Series("parent_codes", parents, dtype=pl.List(pl.String)))


# ---------------------------------------------------------------------------------------------- hospitals
MORTALITY_MECHANISMS = ("physiology", "history")


@dataclass(frozen=True)
class HospitalProfile:
    """How one synthetic hospital differs from the default one. Every default leaves the cohort unchanged (the
    same events, labels and splits for a seed as without a profile)."""

    name: str = "default"  # written into the MEDS dataset name
    code_systems: dict[str, str] = field(default_factory=dict)  # {"LOINC": "LAB"}: LOINC//x is written LAB//x
    age_shift: float = (
        0.0  # years added to every subject's age at the first admission (result clipped to 18-95)
    )
    frailty_shift: float = 0.0  # added to the latent frailty (more admissions, comorbidities, longer stays)
    severity_scale: float = 1.0  # multiplies the severity of every acute illness (labs, vitals, procedures)
    emergency_share: float | None = (
        None  # share of emergency admissions (default 0.62; urgent/elective keep 14:24)
    )
    mortality_mechanism: str = (
        "physiology"  # "physiology" (module docstring) or "history" (see _history_logit)
    )
    local_code_share: float = (
        0.0  # share of the coded vocabulary written as local codes (LOCAL//LOINC:2524-7)
    )
    local_code_seed: int = (
        0  # which codes are local: a share s takes the first s of one seeded order (nested)
    )

    def __post_init__(self) -> None:
        if self.mortality_mechanism not in MORTALITY_MECHANISMS:
            raise ValueError(
                f"mortality_mechanism must be one of {MORTALITY_MECHANISMS}, got {self.mortality_mechanism!r}"
            )
        if self.emergency_share is not None and not 0.0 <= self.emergency_share <= 1.0:
            raise ValueError(f"emergency_share must be in [0, 1], got {self.emergency_share}")
        if self.severity_scale <= 0:
            raise ValueError(f"severity_scale must be positive, got {self.severity_scale}")
        if not 0.0 <= self.local_code_share <= 1.0:
            raise ValueError(f"local_code_share must be in [0, 1], got {self.local_code_share}")
        systems = {code.split("//")[0] for code in CODES if "//" in code}
        for old, new in self.code_systems.items():
            if old not in systems or not new or "//" in new:
                raise ValueError(
                    f"code_systems: {old!r} -> {new!r}: the key must be one of {sorted(systems)} and the new name "
                    "non-empty without '//'"
                )

    def admission_type_p(self) -> list[float]:
        if self.emergency_share is None:
            return [0.62, 0.14, 0.24]
        rest = 1.0 - self.emergency_share
        return [self.emergency_share, rest * 14 / 38, rest * 24 / 38]

    def local_codes(self) -> dict[str, str]:
        """{code: local code} for the `local_code_share` of the coded vocabulary (every code with a system but the
        MEDS ones), chosen as the first share of a `local_code_seed`-seeded order so that a larger share of the
        same seed renames a superset of the codes."""
        coded = [code for code in CODES if "//" in code and not code.startswith("MEDS_")]
        order = np.random.default_rng(self.local_code_seed).permutation(len(coded))
        chosen = [coded[i] for i in order[: round(self.local_code_share * len(coded))]]
        return {code: "LOCAL//" + code.replace("//", ":") for code in chosen}

    def rename(self, codes: pl.Expr) -> pl.Expr:
        """The code column with local codes (`local_code_share`) and renamed code systems."""
        if self.local_code_share:
            codes = codes.replace(self.local_codes())
        for old, new in self.code_systems.items():
            codes = codes.str.replace(f"^{old}//", f"{new}//")
        return codes


DEFAULT_PROFILE = HospitalProfile()


# ---------------------------------------------------------------------------------------------- helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For per-group counts: the owner group of each element and its index within the group."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(owner.size) - starts[owner]


def _zipf_probs(n: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


class _EventBuffer:
    """Column arrays of events: local subject index, hours since STUDY_START (NaN = static), code index,
    value (NaN = none), text index (-1 = none) and an order priority within equal timestamps."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, subj, hours, code, value=None, text=None, prio=3) -> None:
        subj = np.asarray(subj, dtype=np.int64)
        n = subj.size
        if n == 0:
            return

        def full(x, dtype, fill):
            if x is None:
                return np.full(n, fill, dtype=dtype)
            x = np.asarray(x, dtype=dtype)
            return np.broadcast_to(x, (n,)).copy() if x.ndim == 0 else x

        self.parts.append(
            (
                subj,
                full(hours, np.float64, np.nan),
                full(code, np.int32, -1),
                full(value, np.float32, np.nan),
                full(text, np.int8, -1),
                full(prio, np.int8, 3),
            )
        )

    def to_frame(self, subject_ids: np.ndarray) -> pl.DataFrame:
        subj, hours, code, value, text, prio = (np.concatenate(c) for c in zip(*self.parts, strict=True))
        static = np.isnan(hours)
        minutes = np.where(
            static, np.iinfo(np.int64).min, np.round(np.nan_to_num(hours) * 60.0).astype(np.int64)
        )
        order = np.lexsort((prio, minutes, subj))
        subj, static, minutes, code, value, text = (
            a[order] for a in (subj, static, minutes, code, value, text)
        )
        time_us = STUDY_START + minutes * 60_000_000
        code_vocab = pl.Series("code", CODES, dtype=pl.String)
        text_vocab = pl.Series("text_value", [*TEXT_VALUES, None], dtype=pl.String)
        text = np.where(text < 0, len(TEXT_VALUES), text)
        df = pl.DataFrame(
            {
                "subject_id": pl.Series(subject_ids[subj], dtype=pl.Int64),
                "time": pl.Series(time_us, dtype=pl.Int64).cast(pl.Datetime("us")),
                "_static": pl.Series(static),
                "code": code_vocab.gather(code),
                "numeric_value": pl.Series(value, dtype=pl.Float32, nan_to_null=True),
                "text_value": text_vocab.gather(text),
            }
        )
        return (
            df.with_columns(pl.when(pl.col("_static")).then(None).otherwise(pl.col("time")).alias("time"))
            .drop("_static")
            .select(list(DATA_SCHEMA))
        )


# ---------------------------------------------------------------------------------------------- generator


@dataclass
class SyntheticCohort:
    """A generated cohort: MEDS ``events``, ``labels`` per task and subject ``splits``."""

    events: pl.DataFrame
    labels: dict[str, pl.DataFrame]
    splits: pl.DataFrame


def _subject_splits(n_subjects: int, seed: int) -> np.ndarray:
    """Split index (0 train, 1 tuning, 2 held_out) per subject: exactly 70/15/15 % (rounded)."""
    rng = np.random.default_rng([seed, 7_777_777])
    order = rng.permutation(n_subjects)
    n_train = int(round(0.70 * n_subjects))
    n_tuning = int(round(0.15 * n_subjects))
    split = np.empty(n_subjects, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train : n_train + n_tuning]] = 1
    split[order[n_train + n_tuning :]] = 2
    return split


def _mortality_logit(age, prior, emergency, lac, cr, hr_trend, sbp_trend, sbp_last) -> np.ndarray:
    """Risk of in-hospital death from visible history (see module docstring)."""
    high_lac = np.clip(lac - 2.0, 0.0, 8.0)
    z = (
        -3.0
        + 0.035 * (age - 65.0)
        + 0.55 * prior[:, CHRONIC_INDEX["chf"]]
        + 0.35 * prior[:, CHRONIC_INDEX["copd"]]
        + 0.35 * prior[:, CHRONIC_INDEX["ckd"]]
        + 0.80 * prior[:, CHRONIC_INDEX["cancer"]]
        + 0.30 * emergency
        + 0.50 * high_lac
        + 0.45 * np.clip(cr - 1.3, 0.0, 5.0)
        + 0.035 * np.clip(hr_trend, -20.0, 60.0)
        - 0.030 * np.clip(sbp_trend, -60.0, 20.0)
        + 1.00 * ((lac > 4.0) & (sbp_last < 95.0))  # interaction: hyperlactatemia with hypotension
        + 0.03 * np.clip(age - 65.0, 0.0, None) * (cr > 2.0)  # interaction: old age with renal failure
    )
    return z


def _history_logit(age, prior, emergency, lac, cr, hr_trend, sbp_trend, sbp_last) -> np.ndarray:
    """Risk of in-hospital death at a "history" hospital: chronic diagnoses coded in earlier admissions and age
    weigh about twice as much as in :func:`_mortality_logit`, first-day physiology about a third as much."""
    physiology = _mortality_logit(
        age, np.zeros_like(prior), np.zeros_like(emergency), lac, cr, hr_trend, sbp_trend, sbp_last
    )
    physiology = physiology + 3.0 - 0.035 * (age - 65.0)  # its physiological part only
    return (
        -2.9
        + 0.06 * (age - 65.0)
        + 1.1 * prior[:, CHRONIC_INDEX["chf"]]
        + 0.8 * prior[:, CHRONIC_INDEX["copd"]]
        + 0.8 * prior[:, CHRONIC_INDEX["ckd"]]
        + 1.6 * prior[:, CHRONIC_INDEX["cancer"]]
        + 0.5 * prior[:, CHRONIC_INDEX["afib"]]
        + 0.3 * emergency
        + physiology / 3.0
    )


def _generate_chunk(
    subject_ids: np.ndarray, rng: np.random.Generator, profile: HospitalProfile = DEFAULT_PROFILE
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events and labels (both tasks in one frame) for one chunk of subjects."""
    n = subject_ids.size
    buf = _EventBuffer()
    subj_all = np.arange(n)

    # --- subjects
    frailty = rng.normal(size=n) + profile.frailty_shift
    age0 = 18.0 + 72.0 * rng.beta(2.2, 1.6, size=n)
    if profile.age_shift:
        age0 = np.clip(age0 + profile.age_shift, 18.0, 95.0)
    female = rng.random(n) < 0.52
    ethnicity = rng.choice(len(ETHNICITIES), size=n, p=ETHNICITY_P)
    dec = (age0 - 60.0)[:, None] / 10.0
    base = np.array([c[3] for c in CHRONIC])
    per_age = np.array([c[4] for c in CHRONIC])
    per_frail = np.array([c[5] for c in CHRONIC])
    chronic = rng.random((n, len(CHRONIC))) < _sigmoid(base + per_age * dec + per_frail * frailty[:, None])
    first_h = rng.uniform(0.0, 2.0 * 8766.0, size=n)  # first admission within two years of STUDY_START

    buf.add(subj_all, None, np.where(female, _ix("GENDER//F"), _ix("GENDER//M")), prio=0)
    eth_codes = np.array([_ix(f"ETHNICITY//{e}") for e in ETHNICITIES])
    buf.add(subj_all, None, eth_codes[ethnicity], prio=0)
    birth_h = np.floor((first_h - age0 * 8766.0) / 24.0) * 24.0
    buf.add(subj_all, birth_h, _ix("MEDS_BIRTH"), prio=1)

    # --- admissions (flattened over subjects)
    mean_extra = 1.3 * np.exp(0.45 * frailty)
    n_adm = 1 + np.minimum(rng.negative_binomial(1.0, 1.0 / (1.0 + mean_extra)), 40)
    a_subj, a_rank = _ragged(n_adm)
    A = a_subj.size
    los = np.clip(np.exp(rng.normal(np.log(70.0), 0.8, size=A) + 0.15 * frailty[a_subj]), 4.0, 60 * 24.0)
    gap = 24.0 + rng.exponential(150.0 * 24.0 * np.exp(-0.3 * frailty[a_subj]))
    prev_los = np.concatenate([[0.0], los[:-1]])
    inc = np.where(a_rank == 0, first_h[a_subj], prev_los + gap)
    cs = np.cumsum(inc)
    starts = np.flatnonzero(a_rank == 0)
    adm_h = cs - (cs[starts] - inc[starts])[a_subj]
    adm_h = np.round(adm_h * 60.0) / 60.0
    age = age0[a_subj] + (adm_h - first_h[a_subj]) / 8766.0
    adm_type = rng.choice(3, size=A, p=profile.admission_type_p())
    emergency = (adm_type == 0).astype(np.float64)

    # acute reason and severity (latent; drive labs, vitals, codes)
    ch = chronic[a_subj].astype(np.float64)
    f_a = frailty[a_subj]
    logits = np.stack(
        [
            1.3 + 2.0 * (adm_type == 2),
            -0.6 + 0.3 * f_a + 0.01 * (age - 60),
            -2.2 + 2.6 * ch[:, CHRONIC_INDEX["chf"]],
            -1.6 + 1.2 * ch[:, CHRONIC_INDEX["ckd"]] + 0.4 * ch[:, CHRONIC_INDEX["dm"]],
            -1.0 + 0.9 * ch[:, CHRONIC_INDEX["copd"]],
            -3.5 + 3.2 * ch[:, CHRONIC_INDEX["copd"]],
        ],
        axis=1,
    )
    acute = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    is_ = {name: (acute == i).astype(np.float64) for i, (name, _c, _d) in enumerate(ACUTE)}
    sev = (
        rng.gamma(2.0, 0.5, size=A)
        * np.exp(0.2 * f_a)
        * np.where(acute == 0, 0.25, 1.0)
        * profile.severity_scale
    )
    infection = is_["sepsis"] + is_["pneumonia"]
    deterioration = 0.6 * rng.normal(size=A) + sev * (
        is_["sepsis"] + 0.6 * is_["pneumonia"] + 0.6 * is_["hf"]
    )

    # chronic diagnoses coded at each admission (85 %) and "seen in an earlier admission"
    coded = chronic[a_subj] & (rng.random((A, len(CHRONIC))) < 0.85)
    ccs = np.cumsum(coded, axis=0)
    prior = (ccs - coded - (ccs[starts] - coded[starts])[a_subj]) > 0

    # --- first 24 h: vitals
    n_v24 = 4 + rng.poisson(3.0, size=A)
    v_adm, v_k = _ragged(n_v24)
    v_t = np.where(v_k == 0, rng.uniform(0.0, 1.0, v_adm.size), rng.uniform(1.0, 24.0, v_adm.size))
    order = np.lexsort((v_t, v_adm))
    v_t = v_t[order]  # v_adm is already sorted, so only times are permuted within admissions
    hr0 = rng.normal(82.0, 10.0, A) + 10.0 * is_["sepsis"] * sev + 5.0 * ch[:, CHRONIC_INDEX["afib"]]
    hr_slope = rng.normal(0.0, 5.0, A) + 14.0 * deterioration
    sbp0 = rng.normal(128.0, 15.0, A) - 8.0 * is_["sepsis"] * sev + 8.0 * ch[:, CHRONIC_INDEX["htn"]]
    sbp_slope = rng.normal(0.0, 6.0, A) - 16.0 * deterioration
    rr0 = rng.normal(16.5, 2.0, A) + 3.0 * (is_["pneumonia"] + is_["copd_exac"] + is_["sepsis"]) * sev
    spo20 = (
        rng.normal(97.0, 1.2, A)
        - 3.0 * (is_["pneumonia"] + is_["copd_exac"]) * sev
        - 1.5 * ch[:, CHRONIC_INDEX["copd"]]
    )
    temp0 = rng.normal(36.9, 0.3, A) + 1.0 * infection * np.minimum(sev, 2.0)

    def vitals_at(adm: np.ndarray, t: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
        m = adm.size
        frac = np.minimum(t, 48.0) / 24.0
        hr = hr0[adm] + hr_slope[adm] * frac + rng.normal(0, 4.0, m) + 25.0 * extra
        sbp = sbp0[adm] + sbp_slope[adm] * frac + rng.normal(0, 7.0, m) - 35.0 * extra
        return {
            "hr": np.clip(hr, 30, 200),
            "rr": np.clip(
                rr0[adm] + 2.5 * frac * np.maximum(deterioration[adm], 0) + rng.normal(0, 1.5, m) + 8 * extra,
                6,
                50,
            ),
            "spo2": np.clip(spo20[adm] + rng.normal(0, 1.0, m) - 6.0 * extra, 60, 100),
            "sbp": np.clip(sbp, 50, 230),
            "dbp": np.clip(0.6 * sbp + rng.normal(0, 6.0, m), 25, 140),
            "temp": np.clip(temp0[adm] + rng.normal(0, 0.2, m), 34.0, 41.5),
        }

    v24 = vitals_at(v_adm, v_t, np.zeros(v_adm.size))
    v_first = np.flatnonzero(v_k == 0)
    v_last = np.cumsum(n_v24) - 1
    hr_trend = v24["hr"][v_last] - v24["hr"][v_first]
    sbp_trend = v24["sbp"][v_last] - v24["sbp"][v_first]
    sbp_last = v24["sbp"][v_last]

    # --- first 24 h: lab draws
    n_d24 = 1 + rng.binomial(2, 0.5, size=A)
    d_adm, d_k = _ragged(n_d24)
    d_t = np.where(d_k == 0, rng.uniform(0.5, 3.0, d_adm.size), rng.uniform(3.0, 23.5, d_adm.size))
    d_t = d_t[np.lexsort((d_t, d_adm))]
    base_cr = np.exp(rng.normal(np.log(0.9), 0.2, n)) * (1.0 + 1.2 * chronic[:, CHRONIC_INDEX["ckd"]])
    lact_measured_p = np.clip(0.35 + 0.5 * infection + 0.2 * emergency, 0, 0.97)

    def labs_at(adm: np.ndarray, t: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
        m = adm.size
        frac = np.minimum(t, 48.0) / 24.0
        s = sev[adm]
        lac = np.exp(rng.normal(np.log(1.1), 0.25, m)) + is_["sepsis"][adm] * s * 2.2 * (0.6 + 0.5 * frac)
        lac = lac + 0.6 * np.maximum(deterioration[adm], 0) * frac + 3.0 * extra
        cr = (
            base_cr[a_subj[adm]]
            * (
                1.0
                + is_["aki"][adm] * s * 1.1 * (0.6 + 0.6 * frac)
                + 0.15 * is_["hf"][adm]
                + 0.004 * np.maximum(age[adm] - 50, 0)
            )
            + 1.0 * extra
        )
        cr = cr * np.exp(rng.normal(0, 0.06, m))
        lac = np.where(rng.random(m) < lact_measured_p[adm], lac, np.nan)
        return {
            "lactate": np.clip(lac, 0.3, 20.0),
            "creatinine": np.clip(cr, 0.2, 15.0),
            "sodium": np.clip(rng.normal(139.0, 2.5, m) - 4.0 * is_["hf"][adm] * s, 115, 160),
            "potassium": np.clip(rng.normal(4.2, 0.35, m) + 0.7 * is_["aki"][adm] * s, 2.5, 7.5),
            "wbc": np.clip(np.exp(rng.normal(np.log(8.0), 0.25, m)) + 5.0 * infection[adm] * s, 0.5, 60),
            "hemoglobin": np.clip(
                rng.normal(13.5, 1.2, m)
                - 1.2 * female[a_subj[adm]]
                - 1.5 * ch[adm, CHRONIC_INDEX["ckd"]]
                - 1.5 * ch[adm, CHRONIC_INDEX["cancer"]],
                5,
                19,
            ),
            "glucose": np.clip(
                np.exp(rng.normal(np.log(105.0), 0.18, m)) * (1 + 0.6 * ch[adm, CHRONIC_INDEX["dm"]]), 40, 600
            ),
            "bun": np.clip(6.0 + 12.0 * cr + rng.normal(0, 3.0, m), 3, 150),
            "platelets": np.clip(rng.normal(250.0, 60.0, m) - 50.0 * is_["sepsis"][adm] * s, 5, 700),
            "bicarbonate": np.clip(
                rng.normal(25.0, 2.0, m) - 1.5 * np.nan_to_num(np.maximum(lac - 1.5, 0)), 8, 40
            ),
        }

    l24 = labs_at(d_adm, d_t, np.zeros(d_adm.size))
    d_starts = np.flatnonzero(d_k == 0)
    lac_max = np.fmax.reduceat(l24["lactate"], d_starts)
    lac_max = np.where(np.isnan(lac_max), 1.0, lac_max)  # not measured: presumed normal
    cr_max = np.maximum.reduceat(l24["creatinine"], d_starts)

    # --- death: sampled from what is visible at admission + 24 h only
    long_enough = los >= 24.0
    logit = _history_logit if profile.mortality_mechanism == "history" else _mortality_logit
    p_die = _sigmoid(logit(age, prior, emergency, lac_max, cr_max, hr_trend, sbp_trend, sbp_last))
    dies = long_enough & (rng.random(A) < p_die)
    death_rank = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(death_rank, a_subj[dies], a_rank[dies])
    keep = a_rank <= death_rank[a_subj]
    dies &= keep
    death_offset = 24.0 + (los - 24.0) * rng.uniform(0.05, 1.0, A)
    end = np.where(dies, death_offset, los)  # actual stay in hours
    end = np.round((adm_h + end) * 60.0) / 60.0 - adm_h

    kept = np.flatnonzero(keep)
    # emit first-24 h vitals and labs of kept admissions (times before the planned end of stay)
    for key, code, _desc, decimals in VITALS:
        ok = keep[v_adm] & (v_t < los[v_adm])
        buf.add(
            a_subj[v_adm[ok]],
            adm_h[v_adm[ok]] + v_t[ok],
            _ix(f"LOINC//{code}"),
            np.round(v24[key][ok], decimals),
        )
    for key, code, _desc, decimals in LABS:
        vals = l24[key]
        ok = keep[d_adm] & (d_t < los[d_adm]) & ~np.isnan(vals)
        buf.add(
            a_subj[d_adm[ok]], adm_h[d_adm[ok]] + d_t[ok], _ix(f"LOINC//{code}"), np.round(vals[ok], decimals)
        )
    # blood culture at the first draw of infected admissions and some others (text value)
    cult = keep & (rng.random(A) < np.clip(0.15 + 0.8 * infection, 0, 0.95))
    positive = rng.random(A) < np.clip(0.05 + 0.35 * is_["sepsis"], 0, 1)
    first_draw_t = d_t[d_starts]
    buf.add(
        a_subj[cult],
        adm_h[cult] + first_draw_t[cult],
        _ix(f"LOINC//{CULTURE[0]}"),
        text=positive[cult].astype(np.int8),
    )

    # --- after 24 h: vitals every ~8 h and daily labs (a dying subject deteriorates)
    def dying_extra(adm: np.ndarray, t: np.ndarray) -> np.ndarray:
        span = np.maximum(end[adm] - 24.0, 1e-3)
        return np.where(dies[adm], np.clip((t - 24.0) / span, 0, 1), 0.0)

    n_vl = np.where(keep, np.floor(np.maximum(los - 24.0, 0) / 8.0), 0).astype(np.int64)
    w_adm, w_k = _ragged(n_vl)
    w_t = 24.0 + 8.0 * w_k + rng.uniform(0.25, 2.0, w_adm.size)
    ok = w_t < end[w_adm]
    w_adm, w_t = w_adm[ok], w_t[ok]
    vl = vitals_at(w_adm, w_t, dying_extra(w_adm, w_t))
    for key, code, _desc, decimals in VITALS:
        buf.add(a_subj[w_adm], adm_h[w_adm] + w_t, _ix(f"LOINC//{code}"), np.round(vl[key], decimals))
    n_dl = np.where(keep, np.floor(np.maximum(los - 24.0, 0) / 24.0), 0).astype(np.int64)
    e_adm, e_k = _ragged(n_dl)
    e_t = 24.0 + 24.0 * e_k + rng.uniform(4.0, 10.0, e_adm.size)
    ok = e_t < end[e_adm]
    e_adm, e_t = e_adm[ok], e_t[ok]
    ll = labs_at(e_adm, e_t, dying_extra(e_adm, e_t))
    for key, code, _desc, decimals in LABS:
        vals = ll[key]
        m = ~np.isnan(vals)
        buf.add(
            a_subj[e_adm[m]], adm_h[e_adm[m]] + e_t[m], _ix(f"LOINC//{code}"), np.round(vals[m], decimals)
        )

    # --- medications (times drawn over the planned stay, cut at death: counts do not leak the outcome)
    rx_vocab = np.array([_ix(f"RXNORM//{c}") for c, _n in MEDICATIONS[:33]])
    n_rx = rng.poisson(3.0 + 0.5 * los / 24.0 + 1.0 * (acute > 0))
    r_adm, _ = _ragged(n_rx)
    r_code = rx_vocab[rng.choice(rx_vocab.size, size=r_adm.size, p=_zipf_probs(rx_vocab.size, 0.9))]
    r_t = rng.uniform(0.1, 1.0, r_adm.size) * los[r_adm]
    linked = []
    for name, cond in (
        ("insulin", ch[:, CHRONIC_INDEX["dm"]] > 0),
        ("furosemide", (ch[:, CHRONIC_INDEX["chf"]] > 0) | (acute == 2)),
        ("vancomycin", (infection > 0) & (rng.random(A) < 0.8)),
        ("piptazo", (infection > 0) & (rng.random(A) < 0.7)),
        ("albuterol", (ch[:, CHRONIC_INDEX["copd"]] > 0) | (acute == 5)),
        ("ipratropium", (acute == 5)),
        ("prednisone", (acute == 5) & (rng.random(A) < 0.7)),
        ("norepinephrine", (is_["sepsis"] > 0) & (sev > 1.6)),
    ):
        doses = np.where(cond, 1 + np.floor(los / 24.0), 0).astype(np.int64)
        l_adm, l_k = _ragged(doses)
        linked.append(
            (l_adm, 24.0 * l_k + rng.uniform(0.5, 12.0, l_adm.size), _ix(f"RXNORM//{LINKED_MEDS[name]}"))
        )
    r_adm = np.concatenate([r_adm] + [x[0] for x in linked])
    r_t = np.concatenate([r_t] + [x[1] for x in linked])
    r_code = np.concatenate([r_code] + [np.full(x[0].size, x[2]) for x in linked])
    ok = keep[r_adm] & (r_t < end[r_adm]) & (r_t < los[r_adm])
    buf.add(a_subj[r_adm[ok]], adm_h[r_adm[ok]] + r_t[ok], r_code[ok])

    # --- procedures
    px_vocab = np.array([_ix(f"ICD10PCS//{c}") for c, _d in PROCEDURES[4:]])
    n_px = rng.poisson(0.5 + 0.3 * (acute > 0))
    p_adm, _ = _ragged(n_px)
    p_code = px_vocab[rng.choice(px_vocab.size, size=p_adm.size, p=_zipf_probs(px_vocab.size))]
    p_t = rng.uniform(0.05, 1.0, p_adm.size) * los[p_adm]
    extra_px = []
    for i, cond in enumerate(
        (
            ((is_["pneumonia"] + is_["copd_exac"] + is_["sepsis"]) > 0) & (sev > 1.3),  # ventilation
            (is_["aki"] > 0) & (sev > 1.5),  # hemodialysis
            (is_["sepsis"] > 0) & (sev > 1.0),  # central line
            rng.random(A) < 0.04 + 0.1 * ch[:, CHRONIC_INDEX["cancer"]],  # transfusion
        )
    ):
        idx = np.flatnonzero(cond)
        extra_px.append(
            (idx, rng.uniform(0.05, 0.9, idx.size) * los[idx], _ix(f"ICD10PCS//{PROCEDURES[i][0]}"))
        )
    p_adm = np.concatenate([p_adm] + [x[0] for x in extra_px])
    p_t = np.concatenate([p_t] + [x[1] for x in extra_px])
    p_code = np.concatenate([p_code] + [np.full(x[0].size, x[2]) for x in extra_px])
    ok = keep[p_adm] & (p_t < end[p_adm])
    buf.add(a_subj[p_adm[ok]], adm_h[p_adm[ok]] + p_t[ok], p_code[ok])

    # --- admission, diagnoses at discharge, discharge, death
    adm_codes = np.array([_ix(f"ADMISSION//{t}") for t in ADMISSION_TYPES])
    buf.add(a_subj[kept], adm_h[kept], adm_codes[adm_type[kept]], prio=2)
    dis_h = adm_h + end
    chronic_codes = np.array([_ix(f"ICD10CM//{c[1]}") for c in CHRONIC])
    ca, cc = np.nonzero(coded & keep[:, None])
    buf.add(a_subj[ca], dis_h[ca], chronic_codes[cc], prio=4)
    acute_codes = np.array([-1] + [_ix(f"ICD10CM//{c}") for _n, c, _d in ACUTE[1:]])
    aa = np.flatnonzero(keep & (acute > 0) & (rng.random(A) < 0.92))
    buf.add(a_subj[aa], dis_h[aa], acute_codes[acute[aa]], prio=4)
    for key, cond in (
        ("shock", (is_["sepsis"] > 0) & ((sev > 1.8) | dies)),
        ("resp_failure", ((is_["pneumonia"] + is_["copd_exac"]) > 0) & (sev > 1.2)),
        ("hyponatremia", (is_["hf"] > 0) & (sev > 1.2)),
        ("hyperkalemia", (is_["aki"] > 0) & (sev > 1.2)),
        (
            "anemia",
            rng.random(A) < 0.05 + 0.2 * (ch[:, CHRONIC_INDEX["ckd"]] + ch[:, CHRONIC_INDEX["cancer"]]),
        ),
    ):
        idx = np.flatnonzero(keep & cond)
        buf.add(a_subj[idx], dis_h[idx], _ix(f"ICD10CM//{SECONDARY_DX[key][0]}"), prio=4)
    filler = np.array([_ix(f"ICD10CM//{c}") for c, _d in FILLER_DX])
    n_fill = np.where(keep, rng.poisson(1.5 + 0.8 * np.maximum(f_a, 0) + 0.4 * (acute > 0)), 0)
    f_adm, _ = _ragged(n_fill)
    f_code = filler[rng.choice(filler.size, size=f_adm.size, p=_zipf_probs(filler.size))]
    buf.add(a_subj[f_adm], dis_h[f_adm], f_code, prio=4)
    disp = np.where(
        age > 75,
        rng.choice(4, size=A, p=[0.35, 0.2, 0.3, 0.15]),
        rng.choice(4, size=A, p=[0.7, 0.15, 0.08, 0.07]),
    )
    disp = np.where(dies, 4, disp)
    dis_codes = np.array([_ix(f"DISCHARGE//{d}") for d in DISCHARGES])
    buf.add(a_subj[kept], dis_h[kept], dis_codes[disp[kept]], prio=5)
    death_adm = np.flatnonzero(dies)
    buf.add(a_subj[death_adm], dis_h[death_adm], _ix("MEDS_DEATH"), prio=6)
    # deaths after the last discharge (out of hospital)
    last = np.cumsum(n_adm) - 1
    alive = ~np.isin(np.arange(n), a_subj[death_adm])
    p_out = _sigmoid(
        -3.2 + 0.05 * (age[last] - 65.0) + 0.5 * frailty + 0.8 * chronic[:, CHRONIC_INDEX["cancer"]]
    )
    out_death = alive & (rng.random(n) < p_out)
    od = np.flatnonzero(out_death)
    buf.add(od, dis_h[last[od]] + 24.0 + rng.exponential(300.0 * 24.0, od.size), _ix("MEDS_DEATH"), prio=6)

    events = buf.to_frame(subject_ids)
    if profile.code_systems or profile.local_code_share:
        events = events.with_columns(profile.rename(pl.col("code")).alias("code"))

    # --- labels
    lab = np.flatnonzero(keep & long_enough)
    pred_us = STUDY_START + np.round((adm_h[lab] + 24.0) * 60.0).astype(np.int64) * 60_000_000
    labels = pl.DataFrame(
        {
            "subject_id": pl.Series(subject_ids[a_subj[lab]], dtype=pl.Int64),
            "prediction_time": pl.Series(pred_us, dtype=pl.Int64).cast(pl.Datetime("us")),
            "in_hospital_mortality": pl.Series(dies[lab]),
            "long_length_of_stay": pl.Series(end[lab] > 7 * 24.0),
        }
    )
    return events, labels


def _iter_chunks(
    n_subjects: int, seed: int, profile: HospitalProfile | None = None
) -> Iterator[tuple[np.ndarray, pl.DataFrame, pl.DataFrame]]:
    for c, start in enumerate(range(0, n_subjects, CHUNK_SIZE)):
        subject_ids = np.arange(start, min(start + CHUNK_SIZE, n_subjects), dtype=np.int64) + 1
        rng = np.random.default_rng([seed, c])
        events, labels = _generate_chunk(subject_ids, rng, profile or DEFAULT_PROFILE)
        yield subject_ids, events, labels


def _labels_by_task(labels: pl.DataFrame) -> dict[str, pl.DataFrame]:
    out = {}
    for task in TASKS:
        out[task] = (
            labels.select(
                "subject_id",
                "prediction_time",
                pl.col(task).alias("boolean_value"),
                pl.lit(None, dtype=pl.Int64).alias("integer_value"),
                pl.lit(None, dtype=pl.Float64).alias("float_value"),
                pl.lit(None, dtype=pl.String).alias("categorical_value"),
            )
            .select(list(LABEL_SCHEMA))
            .sort("subject_id", "prediction_time")
        )
    return out


def _splits_frame(n_subjects: int, seed: int) -> pl.DataFrame:
    split = _subject_splits(n_subjects, seed)
    return pl.DataFrame(
        {
            "subject_id": pl.Series(np.arange(1, n_subjects + 1), dtype=pl.Int64),
            "split": pl.Series(np.array(SPLITS)[split], dtype=pl.String),
        }
    )


def generate_synthetic_cohort(
    n_subjects: int = 3000, seed: int = 0, profile: HospitalProfile | None = None
) -> SyntheticCohort:
    """Generate ``n_subjects`` subjects (ids 1..n) in memory; deterministic for ``(n_subjects, seed, profile)``.
    `profile` makes a different hospital (:class:`HospitalProfile`; None = the default one).

    For large cohorts prefer :func:`write_synthetic_meds`, which never holds all events at once.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    events, labels = [], []
    for _ids, ev, lab in _iter_chunks(n_subjects, seed, profile):
        events.append(ev)
        labels.append(lab)
    return SyntheticCohort(
        events=pl.concat(events),
        labels=_labels_by_task(pl.concat(labels)),
        splits=_splits_frame(n_subjects, seed),
    )


def write_synthetic_meds(
    output_dir: str | Path,
    n_subjects: int = 3000,
    seed: int = 0,
    n_shards: int | None = None,
    overwrite: bool = False,
    profile: HospitalProfile | None = None,
) -> Path:
    """Generate a cohort and write it as a MEDS folder (atomically); return ``output_dir``. `profile` makes a
    different hospital (:class:`HospitalProfile`; None = the default one).

    Subjects are generated chunk by chunk and written shard by shard, so memory stays bounded by one
    shard. ``n_shards`` shards per split (default: one per ~10,000 subjects); the content does not
    depend on ``n_shards``. Labels: ``labels/in_hospital_mortality.parquet`` and
    ``labels/long_length_of_stay.parquet``.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    n_shards = n_shards or max(1, math.ceil(n_subjects / 10_000))
    n_shards = min(n_shards, n_subjects)
    splits = _splits_frame(n_subjects, seed)
    split_of = splits["split"].to_numpy()
    bounds = [int(b) for b in np.linspace(0, n_subjects, n_shards + 1).round()]
    labels, pending = [], []
    shard = 0
    name = f"synthetic_{n_subjects}_seed{seed}" + (f"_{profile.name}" if profile is not None else "")
    with MEDSWriter(output_dir, overwrite=overwrite, dataset_name=name) as writer:
        for ids, events, lab in _iter_chunks(n_subjects, seed, profile):
            labels.append(lab)
            pending.append(events)
            while shard < n_shards and (ids[-1] >= bounds[shard + 1] or ids[-1] == n_subjects):
                buffer = pl.concat(pending)
                hi = bounds[shard + 1]  # subject ids <= hi belong to this shard (ids are 1-based)
                part, rest = (
                    buffer.filter(pl.col("subject_id") <= hi),
                    buffer.filter(pl.col("subject_id") > hi),
                )
                part = part.with_columns(pl.Series("_split", split_of[part["subject_id"].to_numpy() - 1]))
                for split in SPLITS:
                    sub = part.filter(pl.col("_split") == split).drop("_split")
                    writer.write_shard(
                        validate_events(sub, source=f"<synthetic shard {shard}>"), split, validated=True
                    )
                pending = [rest]
                shard += 1
        for task, df in _labels_by_task(pl.concat(labels)).items():
            writer.write_labels(task, df)
        return writer.commit(splits, codes=synthetic_codes_metadata(profile))


__all__ = [
    "CODES",
    "TASKS",
    "HospitalProfile",
    "SyntheticCohort",
    "generate_synthetic_cohort",
    "synthetic_codes_metadata",
    "write_synthetic_meds",
]
