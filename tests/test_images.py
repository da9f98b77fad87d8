"""Reading radiographs from files: DICOM written here with pydicom (8/12/16-bit, signed,
MONOCHROME1/2, VOI LUT, windows, RLE), PNG/JPEG quirks, and every unreadable kind of file."""

import io
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip('pydicom')
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from mura_jax.data import images  # noqa: E402


def write_dicom(path, pixels, *, bits_stored=None, photometric='MONOCHROME2', window=None,
                voi_lut=None, rescale=None, presentation_shape=None, body_part='WRIST',
                study_uid=None, rle=False, with_pixels=True, voi_lut_item=None,
                modality_lut_item=None):
  """A DX-like DICOM file of `pixels` (uint8/uint16/int16 2-D); `*_lut_item`: a `lut_item`."""
  pixels = np.asarray(pixels)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'  # DX for presentation
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID = study_uid or generate_uid()
  ds.SeriesInstanceUID = generate_uid()
  ds.Modality = 'DX'
  if body_part:
    ds.BodyPartExamined = body_part
  if with_pixels:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == 'i')
    ds.PixelData = pixels.tobytes()
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  if voi_lut is not None:
    item = Dataset()
    item.LUTDescriptor = [len(voi_lut), 0, 8]
    item.add_new(0x00283006, 'US', [int(v) for v in voi_lut])  # LUT Data
    ds.VOILUTSequence = [item]
  if voi_lut_item is not None:
    ds.VOILUTSequence = [voi_lut_item]
  if modality_lut_item is not None:
    ds.ModalityLUTSequence = [modality_lut_item]
  if rescale is not None:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  if presentation_shape:
    ds.PresentationLUTShape = presentation_shape
  if rle:
    ds.compress(RLELossless)
  ds.save_as(path, enforce_file_format=True)
  return path


RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)


def test_monochrome2_8_bit_is_read_as_is(tmp_path):
  view = images.read_view(write_dicom(tmp_path / 'a.dcm', RAMP))
  np.testing.assert_array_equal(view.pixels[..., 0], RAMP)
  assert view.body_part == 'WRIST' and view.study_uid


def test_monochrome1_is_inverted_once_even_with_an_inverse_presentation_lut(tmp_path):
  inverted = 255 - RAMP
  for shape in (None, 'INVERSE'):
    view = images.read_view(write_dicom(tmp_path / f'm1{shape}.dcm', inverted,
                                        photometric='MONOCHROME1', presentation_shape=shape))
    np.testing.assert_array_equal(view.pixels[..., 0], RAMP)  # bone bright, never inverted twice


@pytest.mark.parametrize('bits', [12, 16])
def test_12_and_16_bit_use_the_stored_range(tmp_path, bits):
  pixels = (np.linspace(0, 2 ** bits - 1, 256)).astype(np.uint16).reshape(16, 16)
  view = images.read_view(write_dicom(tmp_path / 'b.dcm', pixels, bits_stored=bits))
  expected = np.round(pixels / (2 ** bits - 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(view.pixels[..., 0], expected)


def test_signed_with_rescale_and_window(tmp_path):
  # CT-like: signed 16-bit, HU = value - 1024, a window of centre 40 and width 400.
  pixels = np.linspace(-1024, 2000, 256).astype(np.int16).reshape(16, 16)
  view = images.read_view(write_dicom(tmp_path / 'c.dcm', pixels, rescale=(1, -1024),
                                      window=(40, 400)))
  hu = pixels.astype(np.float64) - 1024
  # PS3.3 C.11.2.1.2.1, LINEAR, to [0, 1] then 8 bits.
  expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
  np.testing.assert_array_equal(view.pixels[..., 0], np.round(expected * 255).astype(np.uint8))
  assert view.pixels.min() == 0 and view.pixels.max() == 255


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
  pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
  lut = (np.arange(64)[::-1] * 4).astype(np.uint8)  # an inverting LUT of 8-bit outputs
  view = images.read_view(write_dicom(tmp_path / 'd.dcm', pixels, bits_stored=6, voi_lut=lut,
                                      window=(10, 5)))
  np.testing.assert_array_equal(view.pixels[..., 0], lut[pixels])


def lut_item(descriptor, data, descriptor_vr='US', data_vr='US'):
  """A LUT Sequence item: LUT Descriptor (entries, first mapped, bits) and LUT Data as written
  (US: a list of 16-bit words; OW: bytes)."""
  item = Dataset()
  item.add_new(0x00283002, descriptor_vr, list(descriptor))
  item.add_new(0x00283006, data_vr, data)
  return item


def test_8_bit_voi_lut_of_more_than_256_entries(tmp_path):
  """4096 8-bit entries, one to a word: every entry is reachable (an 8-bit index would wrap
  at 256 and squeeze the image into 16 grey levels)."""
  pixels = np.linspace(0, 4095, 256).astype(np.uint16).reshape(16, 16)
  lut = [i // 16 for i in range(4096)]
  view = images.read_view(write_dicom(tmp_path / 'l.dcm', pixels, bits_stored=12,
                                      voi_lut_item=lut_item((4096, 0, 8), lut)))
  np.testing.assert_array_equal(view.pixels[..., 0], pixels // 16)
  assert len(np.unique(view.pixels)) == 256


@pytest.mark.parametrize('data_vr', ['OW', 'US'])
def test_8_bit_lut_entries_packed_two_to_a_word(tmp_path, data_vr):
  """61 8-bit entries in 31 words (low byte first, the last high byte padding), first mapped
  value 2: inputs below it take entry 0, above the last input the last entry."""
  entries = np.array([255 - 4 * i for i in range(61)], np.uint8)
  packed = entries.tobytes() + b'\0'
  data = packed if data_vr == 'OW' else [b | (a << 8) for b, a in zip(packed[::2], packed[1::2])]
  pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
  view = images.read_view(write_dicom(tmp_path / f'{data_vr}.dcm', pixels,
                                      voi_lut_item=lut_item((61, 2, 8), data, data_vr=data_vr)))
  expected = entries[np.clip(pixels.astype(int) - 2, 0, 60)]
  np.testing.assert_array_equal(view.pixels[..., 0], expected)
  assert view.pixels[0, 0, 0] == 255 and view.pixels[7, 7, 0] == 255 - 4 * 60


@pytest.mark.parametrize('descriptor_vr', ['US', 'SS'])
def test_lut_first_mapped_value_signed_by_pixel_representation(tmp_path, descriptor_vr):
  """Signed pixels -100..155 and a first mapped value of -100, written as SS (-100) or as US
  (65436, the same 16 bits): entry i is i * 257 of 16 bits, so pixel p shows as p + 100."""
  pixels = np.arange(-100, 156, dtype=np.int16).reshape(16, 16)
  first = -100 if descriptor_vr == 'SS' else 2 ** 16 - 100
  lut = [i * 257 for i in range(256)]
  view = images.read_view(write_dicom(
      tmp_path / 's.dcm', pixels, voi_lut_item=lut_item((256, first, 16), lut, descriptor_vr)))
  np.testing.assert_array_equal(view.pixels[..., 0], pixels + 100)


def test_lut_of_65536_entries_written_as_0(tmp_path):
  """Entries 0 means 65536; 16-bit OW entries (an inverting table) in little-endian words."""
  pixels = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
  lut = (65535 - np.arange(65536)).astype('<u2').tobytes()
  view = images.read_view(write_dicom(tmp_path / 'z.dcm', pixels,
                                      voi_lut_item=lut_item((0, 0, 16), lut, data_vr='OW')))
  expected = np.round((65535 - pixels.astype(np.float64)) / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(view.pixels[..., 0], expected)


def test_modality_lut_sequence(tmp_path):
  """A Modality LUT of 16-bit entries i * 1000 and no VOI: 8 bits of its 16-bit range."""
  pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
  view = images.read_view(write_dicom(tmp_path / 'm.dcm', pixels, modality_lut_item=lut_item(
      (64, 0, 16), [i * 1000 for i in range(64)])))
  expected = np.round(pixels * 1000.0 / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(view.pixels[..., 0], expected)


def test_a_lut_that_cannot_be_used_names_the_file(tmp_path):
  pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
  short = write_dicom(tmp_path / 'short.dcm', pixels,
                      voi_lut_item=lut_item((64, 0, 16), list(range(10))))
  with pytest.raises(images.ImageError, match='short.dcm: its VOI LUT Data holds 10 16-bit words'):
    images.read_view(short)
  wide = write_dicom(tmp_path / 'wide.dcm', pixels,
                     voi_lut_item=lut_item((64, 0, 8), [300] * 64))
  with pytest.raises(images.ImageError, match='wide.dcm: .*entries up to 300, more than the 8'):
    images.read_view(wide)


def test_any_failure_inside_one_file_is_an_image_error(tmp_path, monkeypatch):
  """A decoder's own exception (here struct.error) becomes the file's ImageError."""
  import struct  # pylint: disable=g-import-not-at-top
  path = write_dicom(tmp_path / 'x.dcm', RAMP)
  def broken(_):
    raise struct.error('unpack_from requires a buffer of 512 bytes')
  monkeypatch.setattr(images, '_read_dicom', broken)
  with pytest.raises(images.ImageError, match=r'x.dcm: cannot be read .*\(error: unpack_from'):
    images.read_view(path)


def test_rle_compressed_equals_uncompressed(tmp_path):
  pixels = (np.random.default_rng(0).integers(0, 4096, (20, 24))).astype(np.uint16)
  plain = images.read_view(write_dicom(tmp_path / 'p.dcm', pixels, bits_stored=12))
  rle = images.read_view(write_dicom(tmp_path / 'r.dcm', pixels, bits_stored=12, rle=True))
  np.testing.assert_array_equal(plain.pixels, rle.pixels)


# pydicom's own small test files (offline, in the wheel): compressed ones beside a lossless twin
# of the same image, decoded by other means (uncompressed, or RLE, which pydicom decodes itself).
def _pydicom_file(name):
  from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top
  path = get_testdata_file(name)
  assert path and os.path.exists(path), f'{name} is not among pydicom\'s offline test files'
  return path


@pytest.mark.parametrize('compressed,syntax,twin', [
    ('MR_small_jpeg_ls_lossless.dcm', '1.2.840.10008.1.2.4.80', 'MR_small.dcm'),  # JPEG-LS
    ('MR_small_jp2klossless.dcm', '1.2.840.10008.1.2.4.90', 'MR_small.dcm'),  # JPEG 2000
    ('SC_rgb_jpeg_gdcm.dcm', '1.2.840.10008.1.2.4.70', 'SC_rgb_rle.dcm'),  # JPEG Lossless SV1
])
def test_the_dicom_extra_decodes_lossless_jpegs_exactly(compressed, syntax, twin):
  pytest.importorskip('gdcm', reason='python-gdcm (pip install "mura-jax[dicom]", as CI does)')
  path = _pydicom_file(compressed)
  assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
  view, reference = images.read_view(path), images.read_view(_pydicom_file(twin))
  np.testing.assert_array_equal(view.pixels, reference.pixels)
  assert len(np.unique(view.pixels)) > 8  # an image, not a constant


def test_deflated_dicom_equals_its_inflated_twin(tmp_path):
  """Deflated Explicit VR Little Endian: everything after the file meta is raw deflate. The twin
  is that stream inflated here by zlib, under the uncompressed transfer syntax."""
  from pydicom.filereader import read_dataset, read_file_meta_info  # pylint: disable=g-import-not-at-top
  path = _pydicom_file('image_dfl.dcm')
  meta = read_file_meta_info(path)
  assert meta.TransferSyntaxUID == '1.2.840.10008.1.2.1.99'
  raw = open(path, 'rb').read()
  meta_end = 132 + 12 + int.from_bytes(raw[140:144], 'little')  # (0002,0000) UL: group length
  body = zlib.decompress(raw[meta_end:], -15)
  twin = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  twin.file_meta = meta
  twin.save_as(tmp_path / 'inflated.dcm', enforce_file_format=True)
  view = images.read_view(path)
  np.testing.assert_array_equal(view.pixels, images.read_view(tmp_path / 'inflated.dcm').pixels)
  assert view.pixels.shape == (512, 512, 1) and len(np.unique(view.pixels)) > 8


def test_a_gray_radiograph_stored_as_ybr_full_reads_back_exactly(tmp_path):
  """Y with Cb = Cr = 128 is gray: YCbCr -> RGB (PS3.3 C.7.6.3.1.2) gives R = G = B = Y, so the
  view is Y exactly and carries no colour warning."""
  y = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (20, 1))  # the whole range: 0 .. 252
  path = write_dicom(tmp_path / 'ybr.dcm', y)
  ds = pydicom.dcmread(path)
  ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, 'YBR_FULL'
  ds.PixelData = np.stack([y, np.full_like(y, 128), np.full_like(y, 128)], -1).tobytes()
  ds.save_as(path, enforce_file_format=True)
  view = images.read_view(path)
  np.testing.assert_array_equal(view.pixels[..., 0], y)
  assert view.warnings == []


# JPEG baseline in YCbCr against the same picture's RGB (RLE, lossless). Lossy: measured max 2
# (YBR_FULL) and 8 (YBR_FULL_422: chroma halved) of 255, mean < 0.5; converting YCbCr twice
# (pydicom already returns RGB) was off by ~100.
@pytest.mark.parametrize('name', ['SC_rgb_jpeg_dcmtk.dcm', 'SC_rgb_dcmtk_+eb+cy+np.dcm'])
def test_ycbcr_jpeg_dicom_is_its_rgb_twin_within_jpegs_loss(name):
  view = images.read_view(_pydicom_file(name))
  reference = images.read_view(_pydicom_file('SC_rgb_rle.dcm'))
  difference = np.abs(view.pixels.astype(int) - reference.pixels)
  assert difference.max() <= 10 and difference.mean() < 1, (difference.max(), difference.mean())


def test_jpeg_2000_in_reversible_colour_reads():
  """YBR_RCT (JPEG 2000 lossless colour): the decoder undoes the transform; no offline twin."""
  pytest.importorskip('gdcm', reason='python-gdcm (pip install "mura-jax[dicom]", as CI does)')
  view = images.read_view(_pydicom_file('GDCMJ2K_TextGBR.dcm'))
  assert view.pixels.shape == (400, 400, 1) and len(np.unique(view.pixels)) > 8


def test_dicom_without_pixels_and_not_dicom(tmp_path):
  with pytest.raises(images.ImageError, match='without pixel data'):
    images.read_view(write_dicom(tmp_path / 'e.dcm', RAMP, with_pixels=False))
  (tmp_path / 'f.dcm').write_bytes(b'not a dicom file at all')
  with pytest.raises(images.ImageError, match='f.dcm: not a readable DICOM'):
    images.read_view(tmp_path / 'f.dcm')


_WITHOUT_DECODERS = """
import importlib.abc, importlib.machinery, sys
class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('gdcm', 'pylibjpeg', 'libjpeg', 'pyjpegls'):
      raise ImportError(name)
sys.meta_path.insert(0, Blocked())
from mura_jax.data import images
try:
  images.read_view(sys.argv[1])
except images.ImageError as e:
  print(e)
"""


def test_missing_decoder_names_the_transfer_syntax_and_the_package(tmp_path):
  path = write_dicom(tmp_path / 'j.dcm', RAMP)
  ds = pydicom.dcmread(path)
  ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
  from pydicom.encaps import encapsulate  # pylint: disable=g-import-not-at-top
  ds.PixelData = encapsulate([b'\xff\xd8 not really jpeg \xff\xd9'])
  ds['PixelData'].VR = 'OB'
  ds.save_as(path, enforce_file_format=True)
  out = subprocess.run([sys.executable, '-c', _WITHOUT_DECODERS, str(path)], capture_output=True,
                       text=True, timeout=120)
  assert 'JPEG Lossless' in out.stdout and 'python-gdcm' in out.stdout, out.stdout + out.stderr
  assert 'j.dcm' in out.stdout


def test_png_quirks_warn(tmp_path):
  gray = np.tile(np.arange(40, dtype=np.uint8), (30, 1))
  rgb = np.stack([gray, gray, gray], -1)
  rgb[0, 0] = (200, 10, 10)  # a colour photograph's pixel
  Image.fromarray(rgb).save(tmp_path / 'colour.png')
  assert any('colour image' in w for w in images.read_view(tmp_path / 'colour.png').warnings)
  rgba = np.concatenate([np.stack([gray] * 3, -1), np.full((30, 40, 1), 255, np.uint8)], -1)
  rgba[:5, :5, 3] = 0
  Image.fromarray(rgba).save(tmp_path / 'alpha.png')
  assert any('transparent' in w for w in images.read_view(tmp_path / 'alpha.png').warnings)
  Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / 'equal.png')
  assert images.read_view(tmp_path / 'equal.png').warnings == []  # MURA's own RGB: exact, silent
  # A JPEG whose EXIF says "rotate 90": read upright (rows and columns swap).
  exif = Image.Exif()
  exif[0x0112] = 6
  buffer = io.BytesIO()
  Image.fromarray(gray).save(buffer, format='JPEG', exif=exif.tobytes())
  (tmp_path / 'rotated.jpg').write_bytes(buffer.getvalue())
  view = images.read_view(tmp_path / 'rotated.jpg')
  assert view.pixels.shape == (40, 30, 1) and 'EXIF orientation 6 applied' in view.warnings[0]


def test_unreadable_pictures_name_the_file(tmp_path):
  (tmp_path / 'text.png').write_text('this is not an image')
  with pytest.raises(images.ImageError, match='text.png: not a readable PNG or JPEG'):
    images.read_view(tmp_path / 'text.png')
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
  Image.fromarray(noise).save(tmp_path / 'whole.png')
  (tmp_path / 'cut.png').write_bytes((tmp_path / 'whole.png').read_bytes()[:2000])
  with pytest.raises(images.ImageError, match='cut.png'):
    images.read_view(tmp_path / 'cut.png')
