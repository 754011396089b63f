"""The manifest's controlled vocabularies and the rules that map header and path text onto them.

One place for the values ``modality``, ``body_part``, ``view`` and ``sex`` may take
(:data:`MODALITIES`, :data:`BODY_PARTS`, :data:`VIEWS`, :data:`SEXES`) and for the keyword tables
that normalise free text (BodyPartExamined, descriptions, protocol names, file paths) to them.
Readers, ingest, de-identification, the synthetic archive and the metadata-supervised method read
them from here; nothing here is identifying or changes at run time.

Body part, age and sex are labels an archive holds for free; pretraining on them (the ``metadata``
method) is the idea of the thread "Transfer Learning for Medical Radiography" on the fast.ai forums
(opened by Sheldon Derkatch, a radiologist, with replies by other radiologists and practitioners;
https://forums.fast.ai/t/transfer-learning-for-medical-radiography/4931).
"""

from __future__ import annotations

import re

MODALITIES = ("CR", "DX", "CT", "MR", "XR", "OT")
BODY_PARTS = (
    "hand", "wrist", "forearm", "elbow", "humerus", "shoulder", "chest", "abdomen", "pelvis", "hip",
    "femur", "knee", "leg", "ankle", "foot", "spine", "skull", "other", "unknown",
)
VIEWS = ("AP", "PA", "LAT", "OBL", "other", "unknown")
KNOWN_SEXES = ("M", "F", "O")  # DICOM PatientSex values kept
SEXES = KNOWN_SEXES + ("unknown",)

# keywords (upper case) of each body part in headers and paths: English, abbreviations, German, Italian
_BODY_WORDS = {
    "hand": "HAND HANDS MANO FINGER FINGERS THUMB METACARPAL METACARPALS PHALANX PHALANGES FINGERS",
    "wrist": "WRIST WRISTS CARPUS CARPAL SCAPHOID HANDGELENK",
    "forearm": "FOREARM FOREARMS RADIUS ULNA UNTERARM",
    "elbow": "ELBOW ELBOWS ELLBOGEN ELLENBOGEN OLECRANON",
    "humerus": "HUMERUS ARM UPPERARM OBERARM",
    "shoulder": "SHOULDER SHOULDERS CLAVICLE SCAPULA SCHULTER ACJ",
    "chest": "CHEST THORAX LUNG LUNGS CXR RIB RIBS STERNUM HEART THORAX TORAX",
    "abdomen": "ABDOMEN ABD KUB BAUCH ABDOMINAL LIVER KIDNEY KIDNEYS",
    "pelvis": "PELVIS BECKEN PELVIC ISCHIUM ILIUM",
    "hip": "HIP HIPS HUEFTE HUFTE",
    "femur": "FEMUR THIGH OBERSCHENKEL FEMORAL",
    "knee": "KNEE KNEES PATELLA KNIE",
    "leg": "LEG LEGS LOWERLEG TIBIA FIBULA UNTERSCHENKEL TIBFIB",
    "ankle": "ANKLE ANKLES OSG SPRUNGGELENK MALLEOLUS",
    "foot": "FOOT FEET TOE TOES CALCANEUS HEEL FUSS FOREFOOT",
    "spine": "SPINE CSPINE TSPINE LSPINE SSPINE CERVICAL LUMBAR SACRUM COCCYX VERTEBRA VERTEBRAE "
             "LWS HWS BWS WIRBELSAEULE SCOLIOSIS",
    "skull": "SKULL HEAD BRAIN SINUS SINUSES FACE MANDIBLE ORBIT ORBITS SCHAEDEL CRANIUM SELLA",
}
BODY_KEYWORDS = {w: part for part, words in _BODY_WORDS.items() for w in words.split()}
VIEW_WORDS = {
    "AP": "AP", "PA": "PA", "LAT": "LAT", "LATERAL": "LAT", "LL": "LAT", "RL": "LAT", "SEITLICH": "LAT",
    "OBL": "OBL", "OBLIQUE": "OBL", "LAO": "OBL", "RAO": "OBL", "LPO": "OBL", "RPO": "OBL", "SCHRAEG": "OBL",
}
# generic BodyPartExamined words: a specific keyword of a description wins over them
_WEAK_WORDS = {"LEG", "LEGS", "ARM", "LOWER", "UPPER", "LIMB", "LIMBS", "EXTREMITY", "L", "R", "LT", "RT",
               "LEFT", "RIGHT", "BOTH"}
_TOKEN_RE = re.compile(r"[A-Za-z]+")


def _tokens(text) -> list[str]:
    return [t.upper() for t in _TOKEN_RE.findall(str(text or ""))]


def body_part_from_text(*texts) -> str | None:
    """First vocabulary keyword found in the texts (in order), or None."""
    for text in texts:
        for tok in _tokens(text):
            if tok in BODY_KEYWORDS:
                return BODY_KEYWORDS[tok]
    return None


def normalise_body_part(body_part_examined=None, *descriptions) -> str:
    """BodyPartExamined, else description keywords; 'other' if only unknown words, 'unknown' if nothing."""
    hit = body_part_from_text(body_part_examined)
    weak = not hit or set(_tokens(body_part_examined)) <= _WEAK_WORDS
    if weak:  # generic header term (LEG, ARM, LOWER LIMB): a specific description keyword wins
        hit = body_part_from_text(*descriptions) or hit
    if hit:
        return hit
    return "other" if str(body_part_examined or "").strip() else "unknown"


def text_facts(text) -> tuple[str | None, str | None]:
    """(:func:`body_part_from_text` of ``text``, the view word :func:`normalise_view` finds in it or None), one scan."""
    body = view = None
    for tok in _tokens(text):
        if body is None:
            body = BODY_KEYWORDS.get(tok)
        if view is None:
            view = VIEW_WORDS.get(tok)
        if body is not None and view is not None:
            break
    return body, view


def normalise_view(view_position=None, *descriptions) -> str:
    """ViewPosition (a known word, else 'other'), else description keywords, else 'unknown'."""
    vp = str(view_position or "").strip().upper()
    if vp:
        for tok in _tokens(vp):
            if tok in VIEW_WORDS:
                return VIEW_WORDS[tok]
        return "other"
    for text in descriptions:
        for tok in _tokens(text):
            if tok in VIEW_WORDS:
                return VIEW_WORDS[tok]
    return "unknown"


def normalise_modality(value) -> str:
    m = str(value or "").strip().upper()
    return m if m in MODALITIES else "OT"


def normalise_sex(value) -> str:
    """DICOM PatientSex -> M, F, O or 'unknown' (its first letter)."""
    s = str(value or "").strip().upper()[:1]
    return s if s in KNOWN_SEXES else "unknown"
